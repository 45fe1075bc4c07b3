"""Analytic FLOPs of what a CLIP step actually runs, and model FLOPs utilisation (MFU).

Counted are the matrix products (2 FLOPs per multiply-add) of an open_clip ViT image tower and
its text transformer, layer by layer: patch embedding, qkv projection, attention scores,
attention-weighted values, output projection, the two MLP matrices, and the final projection of
the pooled token. Norms, softmax, GELU and the losses are left out: they are well under 1% of a
ViT-B's FLOPs and bound by memory, not by the tensor cores that the peak figure describes.

A trained tower costs three forwards per image (forward, and a backward of about twice the
forward: gradients of activations and of weights); a frozen tower one forward; a frozen text
tower whose caption features are cached (Stage 2) nothing per step. MFU is these model FLOPs
per second over the device's dense (no sparsity) bf16 peak: the convention of PaLM's appendix B.
"""

from __future__ import annotations

from dataclasses import dataclass

from clipid.errors import ClipidError
from clipid.models import get_model_config

__all__ = ["TowerShape", "PEAK_BF16_FLOPS", "image_tower_shape", "mfu", "peak_bf16_flops",
           "text_tower_shape", "tower_forward_flops", "train_step_flops"]

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, without 2:4 sparsity.
# Matched against torch.cuda.get_device_name(), most specific name first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),        # SXM (HBM3)
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


@dataclass(frozen=True)
class TowerShape:
    """What the FLOPs of a pre-norm transformer tower depend on."""

    tokens: int          # sequence length (patches + class token, or the text context)
    width: int
    layers: int
    mlp_width: int
    out_dim: int         # projection of the pooled token (0: none)
    patch_dim: int = 0   # image tower: in_channels * patch_size**2 (0: a text tower)
    patches: int = 0     # image tower: patches embedded by the patch convolution


def image_tower_shape(vision_cfg: dict, embed_dim: int,
                      image_size: tuple[int, int] | None = None,
                      patch_stride: int = 0) -> TowerShape:
    """The open_clip ``VisionTransformer`` that ``vision_cfg`` describes (class-token pooling),
    at ``image_size`` (height, width; default the config's) with patches every ``patch_stride``
    pixels (``model.patch_stride``; 0: the patch size)."""
    patch = vision_cfg.get("patch_size")
    if not patch or isinstance(vision_cfg.get("layers"), (list, tuple)):
        raise ClipidError("analytic FLOPs cover ViT image towers only (not ResNets)")
    if vision_cfg.get("attentional_pool") or vision_cfg.get("timm_model_name"):
        raise ClipidError("analytic FLOPs do not cover attentional pooling or timm towers")
    size = image_size or vision_cfg["image_size"]
    h, w = (size, size) if isinstance(size, int) else size
    step = patch_stride or patch
    patches = ((h - patch) // step + 1) * ((w - patch) // step + 1)
    width = int(vision_cfg["width"])
    return TowerShape(tokens=patches + 1, width=width, layers=int(vision_cfg["layers"]),
                      mlp_width=int(width * vision_cfg.get("mlp_ratio", 4.0)),
                      out_dim=embed_dim, patch_dim=3 * patch * patch, patches=patches)


def text_tower_shape(text_cfg: dict, embed_dim: int) -> TowerShape:
    """The open_clip text transformer (causal mask, but every score is still computed)."""
    if text_cfg.get("hf_model_name"):
        raise ClipidError("analytic FLOPs do not cover Hugging Face text towers")
    width = int(text_cfg.get("width", 512))
    return TowerShape(tokens=int(text_cfg.get("context_length", 77)), width=width,
                      layers=int(text_cfg.get("layers", 12)),
                      mlp_width=int(width * text_cfg.get("mlp_ratio", 4.0)), out_dim=embed_dim)


def tower_forward_flops(shape: TowerShape) -> int:
    """FLOPs of one sample's forward pass through a tower."""
    t, d = shape.tokens, shape.width
    per_layer = (2 * t * d * 3 * d             # q, k, v projections
                 + 2 * t * t * d               # scores q k^T (all heads together)
                 + 2 * t * t * d               # scores times v
                 + 2 * t * d * d               # output projection
                 + 2 * 2 * t * d * shape.mlp_width)  # MLP: d -> mlp_width -> d
    patch_embed = 2 * shape.patches * shape.patch_dim * d
    return patch_embed + shape.layers * per_layer + 2 * d * shape.out_dim


def _shapes(model_name: str, image_size: tuple[int, int] | None = None,
            patch_stride: int = 0) -> tuple[TowerShape, TowerShape | None]:
    config = get_model_config(model_name)
    embed = int(config["embed_dim"])
    text = config.get("text_cfg")
    return (image_tower_shape(config["vision_cfg"], embed, image_size, patch_stride),
            text_tower_shape(text, embed) if text else None)


def train_step_flops(model_name: str, batch: int, *, train_image: bool = True,
                     train_text: bool = False, text_forward: bool = False,
                     image_size: tuple[int, int] | None = None, patch_stride: int = 0) -> int:
    """Model FLOPs of one step of ``batch`` images (and ``batch`` captions when the text tower
    runs: ``train_text``, or ``text_forward`` for a frozen tower run every step). A trained tower
    counts three forwards, a frozen one one. ``image_size``/``patch_stride``: ``model.*``'s."""
    image, text = _shapes(model_name, image_size, patch_stride)
    flops = (3 if train_image else 1) * tower_forward_flops(image)
    if (train_text or text_forward) and text is not None:
        flops += (3 if train_text else 1) * tower_forward_flops(text)
    return batch * flops


def peak_bf16_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak of a CUDA device by its name; ``None`` for a CPU or an unknown device."""
    if not device_name:
        return None
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def mfu(flops_per_step: float, steps_per_second: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; ``None`` without a known peak."""
    if peak is None or peak <= 0:
        return None
    return flops_per_step * steps_per_second / peak
