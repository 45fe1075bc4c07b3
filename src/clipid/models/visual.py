"""The image tower's features as CLIP-ReID reads them, and the embedding every consumer uses.

CLIP-ReID (Syliz517/CLIP-ReID, ``model/clip/model.py``) takes three features from one forward
pass of the image tower: the class token after all residual blocks but the last (``x11``, raw),
the class token after the last block and ``ln_post`` (before the projection), and that token
projected. For the modified ResNet the analogues are the average-pooled output of ``layer3``,
the average-pooled output of ``layer4`` and the attention pool's output. Its test feature is
the concatenation of the last two (768 + 512 = 1280-d for ViT-B-16, 2048 + 1024 = 3072-d for
RN50), L2-normalised by the evaluation.

SIE (side information embedding): a learnt vector per training camera, times a coefficient,
added to the class token before the position embedding (ViT only, as in CLIP-ReID).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from clipid.errors import ClipidError

__all__ = ["EMBEDDINGS", "ImageParts", "add_camera_embedding", "embedding_dim", "embedding_kind",
           "encode_image_parts", "image_embedding", "set_embedding", "text_space"]

EMBEDDINGS = ("proj", "concat")
_EMBEDDING_ATTR = "clipid_embedding"   # set on the CLIP module; absent means "proj"
SIE_PARAM = "sie_embed"                # the camera embedding's name under ``model.visual``


@dataclass(frozen=True)
class ImageParts:
    """The three raw features of one image batch, each ``(N, D)``."""

    last_block_cls: torch.Tensor   # CLS after the second-to-last block (ResNet: pooled layer3)
    cls: torch.Tensor              # CLS after ln_post, before the projection (pooled layer4)
    proj: torch.Tensor             # cls @ proj (the attention pool's output)


def encode_image_parts(model: nn.Module, images: torch.Tensor,
                       cameras: torch.Tensor | None = None) -> ImageParts:
    """One forward pass of ``model.visual`` giving :class:`ImageParts`; ``cameras`` (``(N,)``
    rows of the SIE embedding, -1 for none; ``ModelSpec.camera_indices``) adds the SIE offset
    when the model has one."""
    visual = model.visual
    if isinstance(visual, ModifiedResNet):
        return _resnet_parts(visual, images)
    return _vit_parts(visual, images, _camera_offset(visual, cameras))


def _camera_offset(visual: nn.Module, cameras: torch.Tensor | None) -> torch.Tensor | None:
    embed = getattr(visual, SIE_PARAM, None)
    if embed is None or cameras is None:
        return None
    cameras = cameras.to(embed.device)
    known = (cameras >= 0).to(embed.dtype)[:, None]   # -1: a camera SIE has no row for
    return visual.sie_coe * embed[cameras.clamp(min=0)] * known


def _vit_parts(visual: nn.Module, images: torch.Tensor,
               offset: torch.Tensor | None) -> ImageParts:
    if getattr(visual, "attn_pool", None) is not None or visual.pool_type != "tok" \
            or visual.final_ln_after_pool:
        raise ClipidError("image features: only class-token ViTs (CLIP's) are supported")
    x = visual.conv1(images).flatten(2).transpose(1, 2)      # (N, grid, width)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    if offset is not None:
        cls = cls + offset.to(x.dtype)[:, None, :]
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(visual.patch_dropout(x))
    transformer = visual.transformer
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    for block in transformer.resblocks[:-1]:
        x = block(x)
    last = x
    x = transformer.resblocks[-1](x)
    seq_axis = 1 if transformer.batch_first else 0   # the class token is first along it
    last_cls = last.select(seq_axis, 0)
    cls_out = visual.ln_post(x.select(seq_axis, 0))
    proj = cls_out @ visual.proj if visual.proj is not None else cls_out
    return ImageParts(last_cls, cls_out, proj)


def _resnet_parts(visual: ModifiedResNet, images: torch.Tensor) -> ImageParts:
    x = visual.stem(images.to(visual.conv1.weight.dtype))
    x3 = visual.layer3(visual.layer2(visual.layer1(x)))
    x4 = visual.layer4(x3)
    return ImageParts(x3.mean(dim=(2, 3)), x4.mean(dim=(2, 3)), visual.attnpool(x4))


def set_embedding(model: nn.Module, embedding: str) -> None:
    """Which feature :func:`image_embedding` returns for ``model``: ``proj`` or ``concat``."""
    if embedding not in EMBEDDINGS:
        raise ClipidError(f"model.embedding: '{embedding}' is not one of {', '.join(EMBEDDINGS)}")
    setattr(model, _EMBEDDING_ATTR, embedding)


def embedding_kind(model: nn.Module) -> str:
    """``proj`` or ``concat``: what :func:`image_embedding` returns for ``model``."""
    return getattr(model, _EMBEDDING_ATTR, "proj")


def image_embedding(model: nn.Module, images: torch.Tensor,
                    cameras: torch.Tensor | None = None, kind: str | None = None
                    ) -> torch.Tensor:
    """The image feature every consumer embeds with (not normalised): ``proj`` is the CLIP
    embedding, ``concat`` CLIP-ReID's test feature ``cat(cls, proj)``; the model's own choice
    unless ``kind`` names one (CLIP-ReID's prompt stage matches texts to ``proj``)."""
    embedding = kind or embedding_kind(model)
    if embedding == "proj" and (cameras is None or _camera_offset(model.visual, cameras) is None):
        return model.encode_image(images)   # the very computation of open_clip
    parts = encode_image_parts(model, images, cameras)
    if embedding == "proj":
        return parts.proj
    return torch.cat([parts.cls, parts.proj], dim=1)


def text_space(features: np.ndarray, text_dim: int) -> np.ndarray:
    """Unit image embeddings as text queries see them: a ``concat`` embedding's projected part
    (its last ``text_dim`` values) renormalised, which is exactly the unit ``proj`` embedding;
    ``proj`` embeddings as they are."""
    if features.shape[1] == text_dim:
        return features
    tail = features[:, -text_dim:]
    norms = np.linalg.norm(tail, axis=1, keepdims=True)
    return (tail / np.maximum(norms, 1e-12)).astype(features.dtype)


def embedding_dim(model: nn.Module) -> int:
    """Width of :func:`image_embedding`'s output for ``model``."""
    visual = model.visual
    proj_dim = int(visual.output_dim)
    if embedding_kind(model) == "proj":
        return proj_dim
    if isinstance(visual, ModifiedResNet):
        return int(visual.attnpool.k_proj.in_features) + proj_dim
    return int(visual.class_embedding.shape[0]) + proj_dim


def add_camera_embedding(model: nn.Module, cameras: int, coefficient: float,
                         generator: torch.Generator | None = None) -> None:
    """SIE: a ``(cameras, width)`` parameter ``visual.sie_embed``, truncated-normal (std 0.02,
    cut at +-2 as timm's ``trunc_normal_``), scaled by ``coefficient`` when added;
    ``generator`` is a CPU generator."""
    visual = model.visual
    if isinstance(visual, ModifiedResNet):
        raise ClipidError("model.sie: camera embeddings are for ViT image towers (as CLIP-ReID)")
    if cameras < 1:
        raise ClipidError("model.sie: the training set names no cameras")
    width = visual.class_embedding.shape[0]
    weight = torch.zeros(cameras, width)   # drawn on the CPU: the same values on any device
    nn.init.trunc_normal_(weight, std=0.02, a=-2.0, b=2.0, generator=generator)
    setattr(visual, SIE_PARAM, nn.Parameter(weight.to(visual.class_embedding.device)))
    visual.sie_coe = float(coefficient)
