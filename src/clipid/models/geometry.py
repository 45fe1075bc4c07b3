"""What a model is beyond its architecture and weights: activation, input geometry, embedding and
camera embedding (:class:`ModelSpec`), recorded in every checkpoint's sidecar (key ``model``) so
that every loader rebuilds the same network and the same preprocessing.

The geometry follows CLIP-ReID (Syliz517/CLIP-ReID, ``model/clip/model.py``): an input of
``image_size`` (height, width), ViT patches every ``patch_stride`` pixels (overlapping when the
stride is below the patch size) with the pretrained square grid of position embeddings resized
bilinearly to the new grid; for the modified ResNet an optional last stride of 1 and the attention
pool's position embedding resized the same way. The evaluation transform then resizes an image to
exactly (height, width), bilinear, with no crop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from clipid.config import ModelParams
from clipid.errors import ClipidError

__all__ = ["ModelSpec", "apply_geometry", "eval_transform", "model_spec", "preprocess_config",
           "resize_grid_embedding"]


@dataclass(frozen=True)
class ModelSpec:
    """A model's build choices; the defaults are the architecture's own (and clipid's before
    these knobs existed, so an older sidecar without ``model`` reads as the default)."""

    quick_gelu: bool | None = False                 # None (params' auto): as the weights' tag
    image_size: tuple[int, int] | None = None       # (height, width); None: the architecture's
    patch_stride: int = 0                           # ViT: 0 = the patch size
    last_stride: int = 2                            # modified ResNet: stride of layer4 (1 or 2)
    mean: tuple[float, ...] | None = None           # None: the architecture's
    std: tuple[float, ...] | None = None
    embedding: str = "proj"                         # proj | concat (clipid.models.visual)
    sie_cameras: tuple[int, ...] = ()               # SIE: the training cameras' numbers, in
                                                    # embedding order (empty: no SIE)
    sie_coe: float = 1.0                            # SIE: the camera embedding's coefficient

    def to_json(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ModelSpec:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ClipidError(f"model.json: unknown model keys {', '.join(unknown)} (written by "
                              "a newer clipid?)")
        tuples = {key: tuple(data[key]) for key in ("image_size", "mean", "std", "sie_cameras")
                  if data.get(key) is not None}
        return cls(**{**data, **tuples})

    def camera_indices(self, cameras: list[int]) -> torch.Tensor | None:
        """Rows of the SIE embedding for images of ``cameras`` (the manifest's numbers); -1 for
        a camera the training set did not have (no offset). None without SIE."""
        if not self.sie_cameras:
            return None
        row = {camera: i for i, camera in enumerate(self.sie_cameras)}
        return torch.tensor([row.get(int(c), -1) for c in cameras], dtype=torch.long)


def model_spec(params: ModelParams) -> ModelSpec:
    """The spec ``params.yaml``'s ``model:`` asks for; cameras are the training set's, counted
    when a stage with ``model.sie`` builds its model."""
    return ModelSpec(
        quick_gelu=None if params.quick_gelu == "auto" else bool(params.quick_gelu),
        image_size=tuple(params.image_size) if params.image_size else None,
        patch_stride=params.patch_stride, last_stride=params.last_stride,
        mean=tuple(params.mean) if params.mean else None,
        std=tuple(params.std) if params.std else None,
        embedding=params.embedding, sie_coe=params.sie_coe)


def resize_grid_embedding(embedding: torch.Tensor, old_grid: tuple[int, int],
                          new_grid: tuple[int, int]) -> torch.Tensor:
    """``(1 + gh * gw, D)`` position embeddings (class token first) resized bilinearly from
    ``old_grid`` to ``new_grid``; the class token's row is kept."""
    token, grid = embedding[:1], embedding[1:]
    grid = grid.reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bilinear")
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1)
    return torch.cat([token, grid], dim=0)


def _to_2tuple(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) \
        else (int(value), int(value))


def _resize_parameter(owner: nn.Module, name: str, old_grid: tuple[int, int],
                      new_grid: tuple[int, int]) -> None:
    if old_grid == new_grid:
        return
    old = getattr(owner, name)
    with torch.no_grad():
        new = resize_grid_embedding(old.detach(), old_grid, new_grid)
    setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad))


def _vit_geometry(visual: nn.Module, size: tuple[int, int], stride: int) -> None:
    patch = _to_2tuple(visual.patch_size)
    step = (stride, stride) if stride else patch
    grid = ((size[0] - patch[0]) // step[0] + 1, (size[1] - patch[1]) // step[1] + 1)
    if min(grid) < 1:
        raise ClipidError(f"model.image_size: {size[0]}x{size[1]} is smaller than a "
                          f"{patch[0]}x{patch[1]} patch")
    visual.conv1.stride = step
    _resize_parameter(visual, "positional_embedding", _to_2tuple(visual.grid_size), grid)
    visual.grid_size, visual.image_size = grid, size


def _resnet_geometry(visual: ModifiedResNet, size: tuple[int, int], last_stride: int) -> None:
    if last_stride == 1:
        first = visual.layer4[0]
        # CLIP-ReID builds layer4 with stride 1: both average pools of its first block vanish.
        first.avgpool, first.stride = nn.Identity(), 1
        first.downsample[0] = nn.Identity()
    reduction = 32 if last_stride == 2 else 16
    grid = (size[0] // reduction, size[1] // reduction)
    if min(grid) < 1:
        raise ClipidError(f"model.image_size: {size[0]}x{size[1]} is too small for this "
                          f"ResNet (features every {reduction} pixels)")
    old = _to_2tuple(visual.image_size)
    _resize_parameter(visual.attnpool, "positional_embedding",
                      (old[0] // 32, old[1] // 32), grid)
    visual.image_size = size


def apply_geometry(model: nn.Module, spec: ModelSpec) -> None:
    """Give ``model`` (weights loaded) the input geometry of ``spec``; the default spec changes
    nothing. Sets the preprocessing that :func:`preprocess_config` then reports."""
    visual = model.visual
    size = spec.image_size or _to_2tuple(visual.image_size)
    if isinstance(visual, ModifiedResNet):
        if spec.patch_stride:
            raise ClipidError("model.patch_stride: the image tower is a ResNet, not a ViT")
        if spec.image_size or spec.last_stride != 2:
            _resnet_geometry(visual, size, spec.last_stride)
    else:
        if spec.last_stride != 2:
            raise ClipidError("model.last_stride: the image tower is a ViT, not a ResNet")
        if spec.image_size or spec.patch_stride:
            _vit_geometry(visual, size, spec.patch_stride)
    if hasattr(visual, "preprocess_cfg"):   # set by open_clip.create_model
        visual.preprocess_cfg = preprocess_config(visual.preprocess_cfg, spec)


def preprocess_config(base: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """open_clip's ``preprocess_cfg`` with ``spec``'s size (squashed to exactly height x width,
    bilinear, as CLIP-ReID's test transform), mean and std."""
    cfg = dict(base)
    if spec.image_size:
        cfg.update(size=tuple(spec.image_size), resize_mode="squash", interpolation="bilinear")
    if spec.mean:
        cfg["mean"] = tuple(spec.mean)
    if spec.std:
        cfg["std"] = tuple(spec.std)
    return cfg


def eval_transform(preprocess: dict[str, Any]) -> Callable:
    """The one evaluation transform of a ``preprocess_cfg`` (as recorded in a model card):
    evaluation, index, search, serve, the MLflow Model and ONNX export all embed through it."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = {key: tuple(value) if isinstance(value, list) else value
           for key, value in preprocess.items()}
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)
