"""CLIP-ReID's prompts (Li et al., AAAI 2023): a few learnt context tokens per training identity.

A prompt is the template with its ``{ctx}`` slot replaced by ``n_ctx`` token embeddings of the
identity (``a photo of a [v1 v2 v3 v4] garment.``): every other token embedding is the template's
own and stays fixed. Stage ``clipreid_prompts`` learns only those vectors, against the frozen image
and text towers (:func:`learn_prompts`, on the engine's shared epoch loop, so it resumes after a
kill as every stage does); stage ``clipreid`` is the training engine with one more loss term,
contributed through its registry entry (:func:`prompt_terms`): every identity's prompt turned into
one fixed text feature (:func:`identity_text_features`), the classifier of an image-to-text
cross-entropy.

``clipreid.prompts: fixed`` learns nothing: the prompt stage only records the choice, and the
image stage uses the plain template (the same text for every identity) or the mean feature of
the identity's cleaned captions instead.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from clipid.config import Params, flatten_params
from clipid.data.dataset import PreparedData
from clipid.errors import ClipidError
from clipid.features import image_features, text_features
from clipid.models.checkpoint import file_sha256, load_checkpoint, save_checkpoint, sidecar_path
from clipid.models.factory import ClipModel
from clipid.models.stages import model_for_stage
from clipid.runtime import autocast, grad_scaler, resolve_precision
from clipid.stage_registry import get_stage
from clipid.training.loop import EpochLoop, Optimization, TrainingState, epoch_seed, fingerprint
from clipid.training.losses import (
    ImageToTextCrossEntropy,
    PromptContrastiveLoss,
    TextImageSupConLoss,
)
from clipid.training.objective import LossTerm, Outputs, TermContext
from clipid.training.schedule import EpochSchedule, cosine_by_epoch, warmup_cosine
from clipid.workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["PROMPTS_STAGE", "PromptLearner", "PromptResult", "PromptTerm",
           "TextClassifier", "encode_text_embeddings", "fill_template", "identity_text_features",
           "init_model", "learn_prompts", "load_text_classifier",
           "prompt_terms", "prompts_path"]

PROMPTS_STAGE = "clipreid_prompts"   # the DVC stage that learns the prompts
PLACEHOLDER = "X"                    # stands for a learnt token while the template is tokenised


def prompts_path(workspace: Workspace | None = None) -> Path:
    return (workspace or Workspace()).weights(PROMPTS_STAGE)


def fill_template(template: str, noun: str, ctx: str) -> str:
    """``template`` with ``{ctx}`` and ``{noun}`` filled in and whitespace collapsed."""
    if template.count("{ctx}") != 1:
        raise ClipidError(f"clipreid.template: '{template}' must contain {{ctx}} exactly once")
    try:
        text = template.format(ctx=ctx, noun=noun)
    except (KeyError, IndexError, ValueError) as exc:
        raise ClipidError(f"clipreid.template: '{template}' may only use {{ctx}} and {{noun}} "
                          f"({exc!r})") from None
    return re.sub(r"\s+", " ", text).strip()


def init_model(params: Params, device: torch.device, workspace: Workspace | None = None
               ) -> tuple[ClipModel, dict[str, Any]]:
    """The model both CLIP-ReID stages start from (``clipreid.init``) and what identifies its
    weights: prompts only make sense with the text tower they were learnt against."""
    init = params.clipreid.init
    clip = model_for_stage(params, init, device, workspace)
    if get_stage(init).is_pretrained:
        ident = {"init": init, "architecture": clip.architecture, "weights": clip.weights,
                 "seed": params.train.seed if clip.weights == "random" else None}
    else:
        ident = {"init": init, "architecture": clip.architecture, "weights": clip.weights,
                 "sha256": file_sha256(Path(clip.weights))}
    if not hasattr(clip.model, "token_embedding"):
        raise ClipidError(f"model.name: {clip.architecture} has a custom text tower; CLIP-ReID "
                          "prompts need an open_clip CLIP model with its own token embedding")
    return clip, ident


def encode_text_embeddings(model: nn.Module, embeddings: torch.Tensor, tokens: torch.Tensor
                           ) -> torch.Tensor:
    """``model.encode_text`` from token *embeddings* ``(B, L, width)``: open_clip's CLIP looks
    tokens up, adds positions, runs the transformer and pools at the end-of-text token; here the
    look-up is given, so learnt vectors can stand in for tokens. ``tokens`` ``(B, L)`` only
    locate the end-of-text token (unnormalised features)."""
    cast_dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type,
                         eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) \
            else x @ model.text_projection
    return x


class PromptLearner(nn.Module):
    """``n_ctx`` learnt token embeddings per identity inside a fixed tokenised template.

    ``ctx`` ``(identities, n_ctx, width)`` is the only parameter; the template's own token
    embeddings (before and after the slot) are buffers taken from the model once.
    """

    def __init__(self, clip: ClipModel, identities: int, n_ctx: int, template: str, noun: str,
                 seed: int = 0):
        super().__init__()
        model = clip.model
        text = fill_template(template, noun, " ".join([PLACEHOLDER] * n_ctx))
        tokens = clip.tokenizer([text])
        placeholder = int(clip.tokenizer([PLACEHOLDER])[0, 1])
        ids = tokens[0].tolist()
        starts = [i for i in range(len(ids) - n_ctx + 1)
                  if ids[i:i + n_ctx] == [placeholder] * n_ctx]
        used = int((tokens[0] != 0).sum())
        if not starts or used >= tokens.shape[1]:
            raise ClipidError(f"clipreid.template: '{text}' does not fit the text tower's "
                              f"{tokens.shape[1]} tokens with clipreid.n_ctx={n_ctx} learnt "
                              "tokens")
        self.start, self.n_ctx = starts[0], n_ctx
        with torch.no_grad():
            embedded = model.token_embedding(tokens.to(model.token_embedding.weight.device))
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :self.start].detach().clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, self.start + n_ctx:].detach().clone(),
                             persistent=False)
        width = embedded.shape[-1]
        generator = torch.Generator().manual_seed(seed)
        # As CoOp: small random vectors, so no identity starts out closer to any word.
        self.ctx = nn.Parameter(torch.randn(identities, n_ctx, width, generator=generator) * 0.02)

    def forward(self, identities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings ``(B, L, width)`` and tokens ``(B, L)`` of the identities' prompts."""
        count = len(identities)
        embeddings = torch.cat([self.prefix.expand(count, -1, -1), self.ctx[identities],
                                self.suffix.expand(count, -1, -1)], dim=1)
        return embeddings, self.tokens.expand(count, -1)

    def encode(self, model: nn.Module, identities: torch.Tensor, normalize: bool = True
               ) -> torch.Tensor:
        """Text features of the identities' prompts, L2-normalised unless ``normalize`` is
        false (CLIP-ReID's losses read the raw ones)."""
        embeddings, tokens = self(identities)
        feats = encode_text_embeddings(model, embeddings, tokens).float()
        return F.normalize(feats, dim=-1) if normalize else feats


@dataclass
class PromptResult:
    checkpoint: Path
    epochs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    model: nn.Module | None = None   # the frozen model the prompts were learnt against (tests)


def _identities(data: PreparedData) -> tuple[Any, list[str]]:
    rows = data.rows("train")
    if rows.empty:
        raise ClipidError(f"{data.root / 'manifest.csv'}: no training images")
    # Sorted, as the engine labels them: row i of the prompts is label i of the image stage.
    return rows, [str(i) for i in sorted(rows["item_id"].unique())]


class PromptBatches:
    """The prompt stage's batches: slices of a permutation of the cached image features,
    drawn per epoch from its own seeded generator."""

    def __init__(self, count: int, batch: int, seed: int, device: torch.device):
        self.count, self.batch, self.seed, self.device = count, batch, seed, device
        self.order = torch.arange(count, device=device)

    def set_epoch(self, epoch: int) -> None:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        self.order = torch.randperm(self.count, generator=generator).to(self.device)

    def __len__(self) -> int:
        return math.ceil(self.count / self.batch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for begin in range(0, self.count, self.batch):
            yield self.order[begin:begin + self.batch]


class PromptObjective(nn.Module):
    """Images against the prompts of the identities in the batch (both towers frozen):
    ``{"i2t": ..., "t2i": ...}``, CLIP-ReID's first-stage loss.

    ``clipreid.losses: clipid``: normalised features at the logit scale, each identity's prompt
    once (:class:`PromptContrastiveLoss`). ``paper``: as their code, raw features at
    temperature 1 and one prompt per image (:class:`TextImageSupConLoss` both ways).
    """

    def __init__(self, learner: PromptLearner, model: nn.Module, feats: torch.Tensor,
                 labels: torch.Tensor, dtype: torch.dtype, paper: bool = False):
        super().__init__()
        self.learner = learner
        self.frozen = [model]  # in a list: not a submodule, so not in the state_dict
        self.feats, self.labels, self.dtype, self.paper = feats, labels, dtype, paper
        self.scale = model.logit_scale.exp().clamp(max=100).detach().float()
        self.loss = TextImageSupConLoss() if paper else PromptContrastiveLoss()

    def forward(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = self.labels[index]
        if self.paper:
            with autocast(self.feats.device, self.dtype):
                text = self.learner.encode(self.frozen[0], labels, normalize=False).float()
            image = self.feats[index]
            return {"i2t": self.loss(image, text, labels, labels),
                    "t2i": self.loss(text, image, labels, labels)}
        present, rows_of = torch.unique(labels, return_inverse=True)
        with autocast(self.feats.device, self.dtype):
            text = self.learner.encode(self.frozen[0], present)
        i2t, t2i = self.loss(self.feats[index], text.float(), rows_of, self.scale)
        return {"i2t": i2t, "t2i": t2i}


def _prompt_objective(params: Params, clip: ClipModel, data: PreparedData, rows: Any,
                      identities: list[str], device: torch.device) -> PromptObjective:
    """The learner, and every training image's feature computed once (no augmentation)."""
    cfg, model = params.clipreid, clip.model
    model.requires_grad_(False)  # both towers frozen: only the context tokens learn
    model.eval()
    learner = PromptLearner(clip, len(identities), cfg.n_ctx, cfg.template, cfg.noun,
                            seed=params.train.seed).to(device)
    paper = cfg.losses == "paper"
    feats = image_features(model, data.paths(rows), clip.preprocess_val,
                           batch_size=params.eval.batch_size, workers=params.eval.workers,
                           device=device, desc="clipreid image features",
                           embedding="proj", normalize=not paper).to(device)
    label_of = {item: i for i, item in enumerate(identities)}
    labels = torch.tensor([label_of[str(i)] for i in rows["item_id"]], device=device)
    dtype = resolve_precision(params.train.precision, device, "train.precision")
    return PromptObjective(learner, model, feats, labels, dtype, paper)


def _prompt_optimization(params: Params, learner: PromptLearner, steps_per_epoch: int,
                         device: torch.device, dtype: torch.dtype) -> Optimization:
    cfg = params.clipreid
    optimizer = torch.optim.Adam([learner.ctx], lr=cfg.prompt_lr,
                                 weight_decay=cfg.prompt_weight_decay)
    scheduler: Any
    if cfg.prompt_schedule_unit == "epoch":
        scheduler = EpochSchedule(optimizer, cosine_by_epoch(
            cfg.prompt_epochs, cfg.prompt_warmup_epochs, cfg.prompt_warmup_lr, cfg.prompt_lr_min))
    else:
        scheduler = warmup_cosine(optimizer, round(cfg.prompt_warmup_epochs * steps_per_epoch),
                                  cfg.prompt_epochs * steps_per_epoch,
                                  start=cfg.prompt_warmup_lr, floor=cfg.prompt_lr_min)
    return Optimization(optimizer, scheduler, grad_scaler(dtype, device))


def learn_prompts(params: Params, *, device: torch.device, workspace: Workspace | None = None,
                  on_log: Callable[[dict[str, float], int], None] | None = None
                  ) -> PromptResult:
    """Stage ``clipreid_prompts``: learn every training identity's context tokens with both
    towers frozen; writes ``models/clipreid_prompts/prompts.safetensors`` and its sidecar.
    A killed run resumes after its last finished epoch (``.clipid/resume/clipreid_prompts``)."""
    cfg, workspace = params.clipreid, workspace or Workspace()
    data = PreparedData.load(workspace.prepared, with_texts=False)  # captions are not used
    rows, identities = _identities(data)
    clip, init_ident = init_model(params, device, workspace)
    out = prompts_path(workspace)
    meta: dict[str, Any] = {
        "architecture": clip.architecture, "stage": PROMPTS_STAGE, "prompts": cfg.prompts,
        "template": cfg.template, "noun": cfg.noun, "n_ctx": cfg.n_ctx, "losses": cfg.losses,
        "init_model": init_ident, "identities": identities,
        "params": flatten_params(params)}
    if cfg.prompts == "fixed":
        fill_template(cfg.template, cfg.noun, "")  # a bad template fails here, not later
        log.info("%s: clipreid.prompts is fixed: nothing to learn", PROMPTS_STAGE)
        save_checkpoint({}, out, {**meta, "epochs": 0, "history": []})
        return PromptResult(out, 0, 0.0, model=clip.model)

    started = time.perf_counter()
    objective = _prompt_objective(params, clip, data, rows, identities, device)
    features_seconds = time.perf_counter() - started  # the epochs' own are in the state
    count = len(objective.feats)
    batches = PromptBatches(count, min(cfg.prompt_batch_size, count), params.train.seed, device)
    optimization = _prompt_optimization(params, objective.learner, len(batches), device,
                                        objective.dtype)
    state = TrainingState({"prompts": objective.learner, **optimization.parts()})
    resume_dir = workspace.resume_dir(PROMPTS_STAGE)
    key = fingerprint(params, PROMPTS_STAGE, json.dumps(init_ident, sort_keys=True),
                      [data.root / "manifest.csv"], 1)
    if state.resume(resume_dir, key, PROMPTS_STAGE):
        log.info("%s: resuming after epoch %d of %d", PROMPTS_STAGE, state.epoch,
                 cfg.prompt_epochs)
    loop = EpochLoop(PROMPTS_STAGE, lambda index, epoch, batch_no: objective(index),
                     optimization, batches, params.train.seed, params.train.log_every,
                     on_log or (lambda metrics, step: None), batches.set_epoch, device=device)
    loop.run(state, cfg.prompt_epochs, resume_dir, key)
    save_checkpoint({"ctx": objective.learner.ctx.detach()}, out,
                    {**meta, "epochs": cfg.prompt_epochs, "history": state.history})
    shutil.rmtree(resume_dir, ignore_errors=True)
    return PromptResult(out, cfg.prompt_epochs, state.seconds + features_seconds,
                        state.history, model=clip.model)


def _check_prompts(meta: dict[str, Any], params: Params, init_ident: dict[str, Any],
                   path: Path) -> None:
    """The prompts on disk must be those params.yaml asks for, learnt against the same model."""
    cfg = params.clipreid
    wanted = {"prompts": cfg.prompts, "template": cfg.template, "noun": cfg.noun,
              "n_ctx": cfg.n_ctx, "losses": cfg.losses, "init_model": init_ident}
    for key, value in wanted.items():
        if key == "n_ctx" and cfg.prompts == "fixed":
            continue
        if meta.get(key) != value:
            raise ClipidError(f"{sidecar_path(path)}: made with {key}={meta.get(key)!r} "
                              f"but params.yaml gives {value!r}; rerun `clipid clipreid-prompts`")


@torch.no_grad()
def identity_text_features(params: Params, clip: ClipModel, data: PreparedData,
                           identities: list[str], ctx: torch.Tensor | None,
                           device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """``(identities, D)`` L2-normalised text features: the learnt prompts (``ctx`` given), or
    with ``clipreid.prompts: fixed`` the plain template or the mean of each identity's captions.
    Learnt prompts under ``clipreid.losses: paper`` stay raw, as CLIP-ReID's classifier."""
    cfg, model = params.clipreid, clip.model
    model.eval()
    if ctx is not None:
        learner = PromptLearner(clip, len(identities), cfg.n_ctx, cfg.template, cfg.noun)
        learner.ctx.data.copy_(ctx)
        learner = learner.to(device)
        normalize = cfg.losses != "paper"
        chunks = [learner.encode(model, torch.arange(s, min(s + batch_size, len(identities)),
                                                     device=device), normalize).cpu()
                  for s in range(0, len(identities), batch_size)]
        return torch.cat(chunks)
    if cfg.fixed_source == "template":
        text = fill_template(cfg.template, cfg.noun, "")
        log.warning("clipreid.prompts fixed to the template '%s': every identity gets the same "
                    "text feature, so the image-to-text term is a constant", text)
        feature = text_features(model, clip.tokenizer, [text], device=device)
        return feature.expand(len(identities), -1).clone()
    rows, _ = _identities(data)
    captions = data.captions(rows)
    unique = sorted(set(captions))
    encoded = text_features(model, clip.tokenizer, unique, device=device,
                            desc="identity captions")
    index = {c: i for i, c in enumerate(unique)}
    position = {item: i for i, item in enumerate(identities)}
    sums = torch.zeros(len(identities), encoded.shape[1])
    for item, caption in zip(rows["item_id"], captions, strict=True):
        sums[position[str(item)]] += encoded[index[caption]]
    return F.normalize(sums, dim=-1)


@dataclass
class TextClassifier:
    """Fixed text features, one per training identity, as a classifier: the image-to-text
    cross-entropy term of CLIP-ReID's image stage."""

    identities: list[str]        # training item ids, in the engine's label order (sorted)
    features: torch.Tensor       # (identities, D), L2-normalised, never trained
    weight: float                # weight of the term in the loss


def load_text_classifier(params: Params, device: torch.device,
                         workspace: Workspace | None = None) -> tuple[TextClassifier, dict]:
    """Every training identity's text feature (computed once, with the frozen text tower of
    ``clipreid.init``) and the sidecar entries that name the prompts used."""
    workspace = workspace or Workspace()
    path = prompts_path(workspace)
    state, meta = load_checkpoint(path)
    clip, init_ident = init_model(params, device, workspace)
    _check_prompts(meta, params, init_ident, path)
    data = PreparedData.load(workspace.prepared)
    _, identities = _identities(data)
    if meta.get("identities") != identities:
        raise ClipidError(f"{sidecar_path(path)}: learnt for other training identities "
                          f"than {data.root / 'manifest.csv'}; rerun `clipid clipreid-prompts`")
    ctx = state.get("ctx") if params.clipreid.prompts == "learned" else None
    if params.clipreid.prompts == "learned" and ctx is None:
        raise ClipidError(f"{path}: no learnt prompts ('ctx'); rerun `clipid clipreid-prompts`")
    # A plain tensor (text_features returns inference-mode ones): autograd may save it.
    features = identity_text_features(params, clip, data, identities, ctx, device).clone()
    extra = {"prompts": {"checkpoint": str(path), "sha256": file_sha256(path),
                         "mode": params.clipreid.prompts,
                         "fixed_source": params.clipreid.fixed_source
                         if params.clipreid.prompts == "fixed" else None}}
    return TextClassifier(identities, features, params.clipreid.i2t_weight), extra


class PromptTerm(LossTerm):
    """``i2t``: CLIP-ReID's image-stage term, the images against their identities' fixed
    prompt features (label-smoothed cross-entropy at the model's logit scale, not trained;
    ``raw``: on the raw projected feature and raw prompt features, no scale, as their code)."""

    def __init__(self, classifier: TextClassifier, device: torch.device, smoothing: float,
                 raw: bool = False):
        super().__init__("i2t", classifier.weight)
        self.classifier = classifier
        self.features = classifier.features.to(device)  # a plain attribute: DDP leaves it
        self.loss = ImageToTextCrossEntropy(len(classifier.identities), smoothing, raw)

    def forward(self, out: Outputs) -> torch.Tensor:
        return self.loss(out.feats, self.features, out.labels, out.scale.detach())

    def identity(self) -> bytes:
        classifier = self.classifier
        return classifier.features.cpu().numpy().tobytes() + json.dumps(
            [classifier.identities, classifier.weight]).encode()


def prompt_terms(context: TermContext) -> tuple[list[LossTerm], dict[str, Any]]:
    """The ``extra_terms`` of registry entry ``clipreid``: the prompts' ``i2t`` term (none at
    ``clipreid.i2t_weight: 0``) and the sidecar entries that name the prompts."""
    params = context.params
    classifier, extra = load_text_classifier(params, context.device, context.workspace)
    if classifier.identities != context.identities:
        raise ClipidError(f"{context.stage}: the prompts' identities are not the training "
                          f"identities of {context.workspace.manifest}")
    if classifier.weight <= 0:
        return [], extra
    raw = params.clipreid.losses == "paper"
    return [PromptTerm(classifier, context.device, params.train.label_smoothing, raw)], extra
