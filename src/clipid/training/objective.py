"""The stage objective: the towers, the heads, the centres and the loss terms, in one module.

As open_clip's ``TrainingTask`` and torchreid's engines: :class:`Objective` runs one batch
through the towers and returns ``{term: weight * value}``. DDP wraps the whole objective, so
every trained parameter, the BNNeck head and the centres included, gets its gradient averaged
by DDP. Its ``state_dict`` is everything that trains; its optimiser groups come from it.

A loss term is a small :class:`LossTerm` with one call signature, ``term(out) -> value``, over
the batch's :class:`Outputs`. A stage's terms are those of its ``StageParams`` (:func:`
standard_terms`) plus any its registry entry contributes (``StageInfo.extra_terms``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from clipid.config import StageParams, TrainParams
from clipid.models.visual import ImageParts, encode_image_parts
from clipid.runtime import autocast
from clipid.training.heads import BNNeckClassifier
from clipid.training.losses import (
    CenterLoss,
    CrossEntropyLabelSmooth,
    InfoNCELoss,
    SupConLoss,
    TripletLoss,
)
from clipid.training.schedule import DecayRule, param_groups
from clipid.training.towers import set_trainable, tower_parameters

if TYPE_CHECKING:
    from clipid.config import Params
    from clipid.workspace import Workspace

__all__ = ["CenterTerm", "IdentityTerm", "InfoNCETerm", "LossTerm", "Objective", "Outputs",
           "SupConTerm", "TermContext", "ThreeFeatureTripletTerm", "TripletTerm",
           "TwoHeadIdentityTerm", "part_dims", "standard_terms"]


@dataclass(frozen=True)
class TermContext:
    """What a registry entry's ``extra_terms(context) -> (terms, sidecar entries)`` is given."""

    params: Params
    stage: str
    device: Any
    workspace: Workspace
    identities: list[str]   # the training identities in label order (sorted item ids)


@dataclass
class Outputs:
    """One batch through the towers: what every loss term reads."""

    feats: torch.Tensor                # image embeddings, fp32, not normalised
    text: torch.Tensor | None          # caption embeddings, fp32, when the text tower runs
    scale: torch.Tensor                # the logit scale, exp'd and capped
    labels: torch.Tensor               # identity labels, on the device
    captions: torch.Tensor             # caption index of each image
    parts: ImageParts | None = None    # the three raw image features, when a term reads them


class LossTerm(nn.Module):
    """A named, weighted loss term; ``forward(out)`` returns the unweighted value."""

    def __init__(self, name: str, weight: float):
        super().__init__()
        self.name, self.weight = name, weight

    def forward(self, out: Outputs) -> torch.Tensor:
        raise NotImplementedError

    def param_groups(self, lr: float, train: TrainParams) -> list[dict]:
        """AdamW groups of the term's own parameters (a head); none by default."""
        return []

    def own_optimizer(self, train: TrainParams) -> tuple[torch.optim.Optimizer,
                                                         Callable[[], None]] | None:
        """An optimiser outside AdamW and its gradient hook (the centres); none by default."""
        return None

    def exported(self) -> dict[str, torch.Tensor]:
        """Weights that go into the checkpoint under ``heads.``; none by default."""
        return {}

    def identity(self) -> bytes:
        """What a resume state must match beyond params and data (fixed inputs of the term)."""
        return b""


class _ImageText(LossTerm):
    """Image-text contrastive terms: captions from the text tower, or cached when it is frozen."""

    def __init__(self, name: str, weight: float, cached_text: torch.Tensor | None):
        super().__init__(name, weight)
        self.cached_text = cached_text  # a plain attribute: DDP must not broadcast it

    def pair(self, out: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        image = F.normalize(out.feats, dim=-1)
        if self.cached_text is not None:
            return image, self.cached_text[out.captions.to(image.device)]
        return image, F.normalize(out.text, dim=-1)


class SupConTerm(_ImageText):
    def __init__(self, weight: float, cached_text: torch.Tensor | None):
        super().__init__("supcon", weight, cached_text)
        self.loss = SupConLoss()

    def forward(self, out: Outputs) -> torch.Tensor:
        image, text = self.pair(out)
        return self.loss(image, text, out.labels, out.scale)


class InfoNCETerm(_ImageText):
    def __init__(self, weight: float, cached_text: torch.Tensor | None):
        super().__init__("infonce", weight, cached_text)
        self.loss = InfoNCELoss()

    def forward(self, out: Outputs) -> torch.Tensor:
        image, text = self.pair(out)
        return self.loss(image, text, out.scale)


class IdentityTerm(LossTerm):
    """Identity cross-entropy through a BNNeck classifier (exported as ``heads.*``)."""

    def __init__(self, weight: float, dim: int, classes: int, smoothing: float):
        super().__init__("id", weight)
        self.head = BNNeckClassifier(dim, classes)
        self.loss = CrossEntropyLabelSmooth(classes, smoothing)

    def forward(self, out: Outputs) -> torch.Tensor:
        return self.loss(self.head(out.feats), out.labels)

    def param_groups(self, lr: float, train: TrainParams) -> list[dict]:
        return param_groups(list(self.head.named_parameters()), lr * train.head_lr_mult,
                            train.weight_decay, "head", DecayRule.of(train))

    def exported(self) -> dict[str, torch.Tensor]:
        return dict(self.head.state_dict())


class TripletTerm(LossTerm):
    def __init__(self, weight: float, margin: float):
        super().__init__("triplet", weight)
        self.loss = TripletLoss(margin)

    def forward(self, out: Outputs) -> torch.Tensor:
        return self.loss(F.normalize(out.feats, dim=-1), out.labels)


class CenterTerm(LossTerm):
    """Center loss; the centres learn by their own SGD at ``train.center_lr``."""

    def __init__(self, weight: float, classes: int, dim: int):
        super().__init__("center", weight)
        self.center = CenterLoss(classes, dim)

    def forward(self, out: Outputs) -> torch.Tensor:
        return self.center(out.feats, out.labels)

    def own_optimizer(self, train: TrainParams) -> tuple[torch.optim.Optimizer,
                                                         Callable[[], None]]:
        def rescale() -> None:
            # The centres learn at their own rate, independent of the loss weight.
            for p in self.center.parameters():
                p.grad.mul_(1.0 / self.weight)

        return torch.optim.SGD(self.center.parameters(), lr=train.center_lr), rescale


class TwoHeadIdentityTerm(IdentityTerm):
    """CLIP-ReID's identity loss (``make_model_clipreid.py``, ``make_loss.py``): one BNNeck
    classifier on the ``ln_post`` feature (``heads.cls.*``) and one on the projected feature
    (``heads.proj.*``), their label-smoothed cross-entropies summed."""

    def __init__(self, weight: float, dims: tuple[int, int], classes: int, smoothing: float):
        LossTerm.__init__(self, "id", weight)
        self.head = nn.ModuleDict({"cls": BNNeckClassifier(dims[0], classes),
                                   "proj": BNNeckClassifier(dims[1], classes)})
        self.loss = CrossEntropyLabelSmooth(classes, smoothing)

    def forward(self, out: Outputs) -> torch.Tensor:
        parts = _parts(out)
        return (self.loss(self.head["cls"](parts.cls), out.labels)
                + self.loss(self.head["proj"](parts.proj), out.labels))


class ThreeFeatureTripletTerm(TripletTerm):
    """CLIP-ReID's metric loss: batch-hard triplet on each of the three raw features
    (second-to-last block CLS, ``ln_post`` CLS, projected CLS), summed; no normalisation."""

    def forward(self, out: Outputs) -> torch.Tensor:
        parts = _parts(out)
        return sum((self.loss(feature, out.labels)
                    for feature in (parts.last_block_cls, parts.cls, parts.proj)),
                   start=out.feats.new_zeros(()))


def _parts(out: Outputs) -> ImageParts:
    if out.parts is None:  # a programming error: the objective decides whether parts are made
        raise RuntimeError("identity_losses paper needs the image parts")
    return out.parts


def part_dims(model: nn.Module) -> tuple[int, int]:
    """Widths of the ``cls`` and ``proj`` image parts (768 and 512 for ViT-B-16)."""
    visual = model.visual
    if hasattr(visual, "attnpool"):
        return int(visual.attnpool.k_proj.in_features), int(visual.output_dim)
    return int(visual.class_embedding.shape[0]), int(visual.output_dim)


def standard_terms(spec: StageParams, train: TrainParams, classes: int, dim: int,
                   cached_text: torch.Tensor | None, model: nn.Module | None = None
                   ) -> list[LossTerm]:
    """The terms a ``StageParams`` asks for, in the order their sum has always been taken.
    ``identity_losses: paper`` makes CLIP-ReID's identity and triplet terms (``model`` gives
    their widths).

    Call after seeding torch: the head, then the centres, draw their initial weights.
    """
    terms: list[LossTerm] = []
    paper = spec.identity_losses == "paper"
    if paper and model is None:
        raise ValueError("standard_terms: identity_losses paper needs the model")
    if spec.contrastive:
        contrastive = SupConTerm if spec.loss == "supcon" else InfoNCETerm
        terms.append(contrastive(spec.contrastive_weight, cached_text))
    if spec.id_weight > 0 and paper:
        terms.append(TwoHeadIdentityTerm(spec.id_weight, part_dims(model), classes,
                                         train.label_smoothing))
    elif spec.id_weight > 0:
        terms.append(IdentityTerm(spec.id_weight, dim, classes, train.label_smoothing))
    if spec.triplet_weight > 0:
        triplet = ThreeFeatureTripletTerm if paper else TripletTerm
        terms.append(triplet(spec.triplet_weight, train.triplet_margin))
    if spec.center_weight > 0:
        terms.append(CenterTerm(spec.center_weight, classes, dim))
    return terms


class Towers(nn.Module):
    """Both towers and the logit scale: what ``train.compile`` compiles. With ``parts`` the
    image tower gives CLIP-ReID's three raw features (:func:`encode_image_parts`), the
    projected one being the embedding."""

    def __init__(self, model: nn.Module, parts: bool = False):
        super().__init__()
        self.model, self.parts = model, parts

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None,
                cameras: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, ImageParts | None]:
        text = self.model.encode_text(tokens) if tokens is not None else None
        # Capped as in CLIP: a temperature below 1/100 makes training unstable.
        scale = self.model.logit_scale.exp().clamp(max=100)
        if self.parts or cameras is not None:  # SIE: the camera offset is in the parts' pass
            parts = encode_image_parts(self.model, images, cameras)
            return parts.proj, text, scale, parts
        return self.model.encode_image(images), text, scale, None


class Objective(nn.Module):
    """The towers and the loss terms of one stage; ``forward`` gives ``{term: weighted}``.

    ``tokens`` are the tokenised captions when the text tower trains (indexed per batch);
    ``dtype`` is the autocast type of the towers (the losses always run in fp32).
    """

    def __init__(self, model: nn.Module, terms: list[LossTerm], spec: StageParams, *,
                 tokens: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.towers = Towers(model, parts=spec.identity_losses == "paper")
        self.terms = nn.ModuleList(terms)
        self.spec, self.tokens, self.dtype = spec, tokens, dtype

    @property
    def model(self) -> nn.Module:
        return self.towers.model

    def forward(self, images: torch.Tensor, labels: torch.Tensor, captions: torch.Tensor,
                cameras: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        tokens = self.tokens[captions.to(self.tokens.device)] if self.tokens is not None \
            else None
        with autocast(images.device, self.dtype):
            feats, text, scale, parts = self.towers(images, tokens, cameras)
        # The losses run in fp32: softmax over scaled similarities overflows in fp16.
        if parts is not None:
            parts = ImageParts(parts.last_block_cls.float(), parts.cls.float(),
                               parts.proj.float())
        out = Outputs(feats.float(), text.float() if text is not None else None, scale,
                      labels, captions, parts)
        return {term.name: term.weight * term(out) for term in self.terms}

    def start_epoch(self) -> None:
        """Train mode for what trains, eval mode (and no gradients) for what is frozen."""
        spec = self.spec
        set_trainable(self.model, image=spec.train_image, text=spec.train_text,
                      scale=spec.contrastive)
        for term in self.terms:
            term.train()

    def param_groups(self, train: TrainParams) -> list[dict]:
        """Optimiser groups: image tower, text tower, logit scale, then the terms' own (head)."""
        spec, model, rule = self.spec, self.model, DecayRule.of(train)
        lr = train.lr * spec.lr_mult
        groups = param_groups(tower_parameters(model, "image"), lr, train.weight_decay, "image",
                              rule)
        groups += param_groups(tower_parameters(model, "text"), train.lr * spec.text_lr_mult,
                               train.weight_decay, "text", rule)
        groups += param_groups(tower_parameters(model, "scale"), lr, 0.0, "scale", rule)
        for term in self.terms:
            groups += term.param_groups(lr, train)
        return groups

    def own_optimizers(self, train: TrainParams) -> list[tuple[torch.optim.Optimizer,
                                                               Callable[[], None]]]:
        return [own for term in self.terms if (own := term.own_optimizer(train)) is not None]

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """The model's weights and, under ``heads.``, the terms' exported ones."""
        weights = dict(self.model.state_dict())
        for term in self.terms:
            weights.update({f"heads.{k}": v for k, v in term.exported().items()})
        return weights

    def identity(self) -> bytes:
        return b"".join(term.identity() for term in self.terms)
