"""Creating models: an open_clip architecture with pretrained weights, random weights, a local
weight file, or a clipid checkpoint."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import open_clip
import torch

from clipid.checks import WEIGHT_SUFFIXES, looks_like_weight_file
from clipid.errors import ClipidError
from clipid.models import get_model_config
from clipid.models.checkpoint import load_checkpoint
from clipid.models.geometry import ModelSpec, apply_geometry, eval_transform
from clipid.models.visual import add_camera_embedding, set_embedding

log = logging.getLogger(__name__)

__all__ = ["ClipModel", "ModelLoadError", "create_model", "load_model", "looks_like_weight_file",
           "WEIGHT_SUFFIXES"]


class ModelLoadError(ClipidError):
    """Weights that cannot be had: unknown tag, missing file, offline machine."""


@dataclass
class ClipModel:
    """A CLIP model with what it needs around it: its transforms, its tokenizer, and where its
    weights came from (recorded with every run)."""

    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    architecture: str
    weights: str                    # "random", an open_clip tag, a file path or a checkpoint path
    metadata: dict[str, Any] = field(default_factory=dict)  # a checkpoint's sidecar, if any
    spec: ModelSpec = field(default_factory=ModelSpec)     # activation, geometry, embedding

    def sidecar(self) -> dict[str, Any]:
        """What a checkpoint of this model must record so that a loader rebuilds it."""
        return {"architecture": self.architecture, "model": self.spec.to_json()}

    def add_cameras(self, cameras: list[int], generator: torch.Generator | None = None) -> None:
        """SIE: a learnt embedding for each training camera (the manifest's numbers)."""
        numbers = tuple(sorted({int(c) for c in cameras if int(c) >= 0}))
        add_camera_embedding(self.model, len(numbers), self.spec.sie_coe, generator)
        self.spec = replace(self.spec, sie_cameras=numbers)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def _transforms(model: torch.nn.Module) -> tuple[Callable, Callable]:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    return image_transform_v2(cfg, is_train=True), eval_transform(model.visual.preprocess_cfg)


def _tag_quick_gelu(name: str, pretrained: str) -> bool:
    """What open_clip marks for ``pretrained`` (``openai``: QuickGELU); False for a weight file
    or random weights, which carry no mark."""
    if not pretrained or looks_like_weight_file(pretrained):
        return False
    return bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))


def _resolve_spec(name: str, pretrained: str, spec: ModelSpec | None) -> ModelSpec:
    """``spec`` with its activation decided: the tag's (auto) or the user's, or the
    architecture's own QuickGELU (``*-quickgelu`` configs)."""
    spec = spec or ModelSpec()
    wanted = _tag_quick_gelu(name, pretrained) if spec.quick_gelu is None else spec.quick_gelu
    return replace(spec, quick_gelu=bool(wanted or get_model_config(name).get("quick_gelu")))


def _finish(model: torch.nn.Module, spec: ModelSpec) -> torch.nn.Module:
    """The geometry and embedding of ``spec`` on a model whose weights are in place."""
    apply_geometry(model, spec)
    set_embedding(model, spec.embedding)
    return model.eval()


def _clip_model(model: torch.nn.Module, name: str, weights: str, spec: ModelSpec,
                metadata: dict[str, Any] | None = None) -> ClipModel:
    train, val = _transforms(model)
    return ClipModel(model, train, val, open_clip.get_tokenizer(name), name, weights,
                     metadata or {}, spec)


def create_model(name: str, pretrained: str = "", seed: int = 0,
                 device: str | torch.device = "cpu", spec: ModelSpec | None = None) -> ClipModel:
    """Build ``name`` with weights from ``pretrained``, shaped by ``spec`` (activation, input
    geometry, embedding; default: the architecture's own).

    ``pretrained`` is an open_clip tag (``openai``, downloaded and cached by open_clip), a local
    ``.safetensors``/``.pt`` file (read with ``weights_only``: no pickled code runs), or empty for a
    seeded random initialisation (logged as a warning).
    """
    get_model_config(name)  # a clear error for an unknown architecture
    spec = _resolve_spec(name, pretrained, spec)
    build = {"device": device, "force_quick_gelu": spec.quick_gelu}
    if not pretrained:
        log.warning("model.pretrained is empty: %s starts from RANDOM weights (seed %d)",
                    name, seed)
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None, **build)
        weights = "random"
    elif looks_like_weight_file(pretrained):
        model = _from_weight_file(name, Path(pretrained).expanduser(), build)
        weights = str(Path(pretrained).expanduser())
    else:
        model = _from_tag(name, pretrained, build)
        weights = pretrained
    return _clip_model(_finish(model, spec), name, weights, spec)


def _from_weight_file(name: str, path: Path, build: dict[str, Any]) -> torch.nn.Module:
    if not path.is_file():
        raise ModelLoadError(f"model.pretrained: weight file '{path}' not found")
    try:
        model = open_clip.create_model(name, pretrained=None, **build)
        open_clip.load_checkpoint(model, str(path), weights_only=True,
                                  device=str(build["device"]))
    except (RuntimeError, KeyError, ValueError, OSError, pickle.UnpicklingError) as exc:
        raise ModelLoadError(f"model.pretrained: cannot load '{path}' into {name}: "
                             f"{str(exc).splitlines()[0]}") from exc
    return model


def _from_tag(name: str, pretrained: str, build: dict[str, Any]) -> torch.nn.Module:
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ModelLoadError(f"model.pretrained: '{pretrained}' is not a pretrained tag of "
                             f"{name} (tags: {', '.join(tags) or 'none'}) nor a weight file")
    try:
        return open_clip.create_model(name, pretrained=pretrained, **build)
    except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
        raise ModelLoadError(
            f"model.pretrained: could not get the '{pretrained}' weights of {name} (is this "
            f"machine offline?): {str(exc).splitlines()[0]}\nOn a machine with internet, "
            f"open_clip.create_model('{name}', pretrained='{pretrained}') caches them under "
            "~/.cache/huggingface; or save the weights as a .safetensors/.pt file and set "
            "model.pretrained to its path.") from exc


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> ClipModel:
    """A model saved by clipid: the architecture and its spec (activation, geometry, embedding,
    cameras) from the sidecar, the weights from safetensors."""
    state, meta = load_checkpoint(checkpoint)
    name = meta["architecture"]
    spec = ModelSpec.from_json(meta.get("model"))
    # open_clip warns "initialized randomly" here; the checkpoint's weights follow at once.
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(name, pretrained=None, device=device,
                                       force_quick_gelu=bool(spec.quick_gelu))
    finally:
        logging.disable(logging.NOTSET)
    _finish(model, spec)
    if spec.sie_cameras:
        add_camera_embedding(model, len(spec.sie_cameras), spec.sie_coe)
    clip_state = {k: v for k, v in state.items() if not k.startswith("heads.")}
    model.load_state_dict(clip_state, strict=True)
    model.eval()
    return _clip_model(model, name, str(checkpoint), spec, meta)
