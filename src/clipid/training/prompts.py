"""CLIP-ReID's prompts (Li et al., AAAI 2023): a few learnt context tokens per training identity.

A prompt is the template with its ``{ctx}`` slot replaced by ``n_ctx`` token embeddings of the
identity (``a photo of a [v1 v2 v3 v4] garment.``): every other token embedding is the template's
own and stays fixed. Stage ``clipreid_prompts`` learns only those vectors, against the frozen image
and text towers (:func:`learn_prompts`); stage ``clipreid_image`` then turns every identity's
prompt into one fixed text feature (:func:`identity_text_features`), the classifier of its
image-to-text cross-entropy term.

``clipreid.prompts: fixed`` learns nothing: the prompt stage only records the choice, and the
image stage uses the plain template (the same text for every identity) or the mean feature of
the identity's cleaned captions instead.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn
from tqdm import tqdm

from clipid.config import Params, StageParams, flatten_params
from clipid.data.dataset import PreparedData
from clipid.errors import ClipidError
from clipid.features import image_features, text_features
from clipid.losses import PromptContrastiveLoss
from clipid.models.checkpoint import file_sha256, load_checkpoint, save_checkpoint, sidecar_path
from clipid.models.factory import ClipModel, load_model
from clipid.models.stages import model_for_stage
from clipid.runtime import autocast, grad_scaler, resolve_precision
from clipid.stage_registry import get_stage
from clipid.training.engine import TextClassifier
from clipid.training.schedule import warmup_cosine

log = logging.getLogger(__name__)

__all__ = ["PROMPTS_STAGE", "IMAGE_STAGE", "PromptLearner", "PromptResult",
           "encode_text_embeddings", "fill_template", "identity_text_features", "image_stage_spec",
           "init_model", "learn_prompts", "load_text_classifier", "prompts_path"]

PROMPTS_STAGE = "clipreid_prompts"   # the DVC stage that learns the prompts
IMAGE_STAGE = "clipreid"             # the trained model: models/clipreid, metrics/clipreid.json
PLACEHOLDER = "X"                    # stands for a learnt token while the template is tokenised


def prompts_path(models_dir: Path = Path("models")) -> Path:
    return models_dir / PROMPTS_STAGE / "prompts.safetensors"


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


def image_stage_spec(params: Params) -> StageParams:
    """The engine's description of ``clipreid_image``: image tower only, no image-text
    contrastive term (the prompts' cross-entropy replaces it), identity losses, PK sampler."""
    cfg = params.clipreid
    return StageParams(init=cfg.init, train_image=True, train_text=False, loss="none",
                       contrastive_weight=0.0, id_weight=cfg.id_weight,
                       triplet_weight=cfg.triplet_weight, center_weight=cfg.center_weight,
                       sampler="pk", epochs=cfg.epochs, lr_mult=cfg.lr_mult)


def init_model(params: Params, device: torch.device, models_dir: Path = Path("models")
               ) -> tuple[ClipModel, dict[str, Any]]:
    """The model both CLIP-ReID stages start from (``clipreid.init``) and what identifies its
    weights: prompts only make sense with the text tower they were learnt against."""
    init = params.clipreid.init
    if get_stage(init).kind == "pretrained":
        clip = model_for_stage(params, init, device)
        ident = {"init": init, "architecture": clip.architecture, "weights": clip.weights,
                 "seed": params.train.seed if clip.weights == "random" else None}
    else:  # (issue 15: a Workspace replaces models_dir next)
        path = models_dir / init / "model.safetensors"
        if not path.is_file():
            raise ClipidError(f"clipreid.init is '{init}' but {path} does not exist; train "
                              f"{init} first (and add models/{init} to the deps of both clipreid "
                              "stages in dvc.yaml)")
        clip = load_model(path, device=device)
        ident = {"init": init, "architecture": clip.architecture, "weights": str(path),
                 "sha256": file_sha256(path)}
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

    def encode(self, model: nn.Module, identities: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features of the identities' prompts."""
        embeddings, tokens = self(identities)
        return F.normalize(encode_text_embeddings(model, embeddings, tokens).float(), dim=-1)


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


def learn_prompts(params: Params, *, device: torch.device, prepared: Path = Path("data/prepared"),
                  models_dir: Path = Path("models"),
                  on_log: Callable[[dict[str, float], int], None] | None = None
                  ) -> PromptResult:
    """Stage ``clipreid_prompts``: learn every training identity's context tokens with both
    towers frozen; writes ``models/clipreid_prompts/prompts.safetensors`` and its sidecar."""
    cfg, train_cfg = params.clipreid, params.train
    on_log = on_log or (lambda metrics, step: None)
    data = PreparedData.load(prepared, with_texts=False)  # the captions are not used here
    rows, identities = _identities(data)
    clip, init_ident = init_model(params, device, models_dir)
    model = clip.model
    out = prompts_path(models_dir)
    meta: dict[str, Any] = {
        "architecture": clip.architecture, "stage": PROMPTS_STAGE, "prompts": cfg.prompts,
        "template": cfg.template, "noun": cfg.noun, "n_ctx": cfg.n_ctx,
        "init_model": init_ident, "identities": identities,
        "params": flatten_params(params)}
    if cfg.prompts == "fixed":
        fill_template(cfg.template, cfg.noun, "")  # a bad template fails here, not later
        log.info("%s: clipreid.prompts is fixed: nothing to learn", PROMPTS_STAGE)
        save_checkpoint({}, out, {**meta, "epochs": 0, "history": []})
        return PromptResult(out, 0, 0.0, model=model)

    model.requires_grad_(False)  # both towers frozen: only the context tokens learn
    model.eval()
    learner = PromptLearner(clip, len(identities), cfg.n_ctx, cfg.template, cfg.noun,
                            seed=train_cfg.seed).to(device)
    started = time.perf_counter()
    # No augmentation: every image's feature is computed once and reused in every epoch.
    feats = image_features(model, data.paths(rows), clip.preprocess_val,
                           batch_size=params.eval.batch_size, workers=params.eval.workers,
                           device=device, desc="clipreid image features").to(device)
    label_of = {item: i for i, item in enumerate(identities)}
    labels = torch.tensor([label_of[str(i)] for i in rows["item_id"]], device=device)
    scale = model.logit_scale.exp().clamp(max=100).detach().float()

    optimizer = torch.optim.Adam([learner.ctx], lr=cfg.prompt_lr,
                                 weight_decay=cfg.prompt_weight_decay)
    count = len(feats)
    batch = min(cfg.prompt_batch_size, count)
    steps_per_epoch = math.ceil(count / batch)
    total = cfg.prompt_epochs * steps_per_epoch
    scheduler = warmup_cosine(optimizer, round(cfg.prompt_warmup_epochs * steps_per_epoch), total)
    dtype = resolve_precision(train_cfg.precision, device, "train.precision")
    scaler = grad_scaler(dtype, device)
    loss_fn = PromptContrastiveLoss()

    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(cfg.prompt_epochs):
        generator = torch.Generator().manual_seed(train_cfg.seed * 100_003 + epoch)
        order = torch.randperm(count, generator=generator).to(device)
        sums: dict[str, float] = {}
        for begin in tqdm(range(0, count, batch), desc=f"{PROMPTS_STAGE} epoch {epoch + 1}/"
                          f"{cfg.prompt_epochs}", unit="batch", leave=False):
            index = order[begin:begin + batch]
            present, rows_of = torch.unique(labels[index], return_inverse=True)
            with autocast(device, dtype):
                text = learner.encode(model, present)
            i2t, t2i = loss_fn(feats[index], text.float(), rows_of, scale)
            loss = i2t + t2i
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            values = {"i2t": float(i2t.detach()), "t2i": float(t2i.detach()),
                      "loss": float(loss.detach())}
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            if step % train_cfg.log_every == 0 or step == total:
                on_log({**{f"train/{k}": v for k, v in values.items()},
                        "train/lr": optimizer.param_groups[0]["lr"]}, step)
        history.append({k: v / steps_per_epoch for k, v in sums.items()})
        log.info("%s epoch %d/%d: %s", PROMPTS_STAGE, epoch + 1, cfg.prompt_epochs,
                 ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items()))
        on_log({f"epoch/{k}": v for k, v in history[-1].items()}, epoch + 1)
    seconds = time.perf_counter() - started
    save_checkpoint({"ctx": learner.ctx.detach()}, out,
                    {**meta, "epochs": cfg.prompt_epochs, "history": history})
    return PromptResult(out, cfg.prompt_epochs, seconds, history, model=model)


def _check_prompts(meta: dict[str, Any], params: Params, init_ident: dict[str, Any],
                   path: Path) -> None:
    """The prompts on disk must be those params.yaml asks for, learnt against the same model."""
    cfg = params.clipreid
    wanted = {"prompts": cfg.prompts, "template": cfg.template, "noun": cfg.noun,
              "n_ctx": cfg.n_ctx, "init_model": init_ident}
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
    with ``clipreid.prompts: fixed`` the plain template or the mean of each identity's captions."""
    cfg, model = params.clipreid, clip.model
    model.eval()
    if ctx is not None:
        learner = PromptLearner(clip, len(identities), cfg.n_ctx, cfg.template, cfg.noun)
        learner.ctx.data.copy_(ctx)
        learner = learner.to(device)
        chunks = [learner.encode(model, torch.arange(s, min(s + batch_size, len(identities)),
                                                     device=device)).cpu()
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


def load_text_classifier(params: Params, device: torch.device,
                         prepared: Path = Path("data/prepared"),
                         models_dir: Path = Path("models")) -> tuple[TextClassifier, dict]:
    """What ``clipreid_image`` adds to the engine: every training identity's text feature
    (computed once, with the frozen text tower of ``clipreid.init``) and the sidecar entries
    that name the prompts used."""
    path = prompts_path(models_dir)
    state, meta = load_checkpoint(path)
    clip, init_ident = init_model(params, device, models_dir)
    _check_prompts(meta, params, init_ident, path)
    data = PreparedData.load(prepared)
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
