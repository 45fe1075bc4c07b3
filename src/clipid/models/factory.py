"""Creating models: an open_clip architecture with pretrained weights, random weights, a local
weight file, or a clipid checkpoint."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch

from clipid.checks import WEIGHT_SUFFIXES, looks_like_weight_file
from clipid.models import get_model_config
from clipid.models.checkpoint import load_checkpoint
from clipid.models.hub import HubUnavailable, ModelLoadError, hub_access, hub_repo, is_hub_name

log = logging.getLogger(__name__)

__all__ = ["ClipModel", "ModelLoadError", "create_model", "load_model", "looks_like_weight_file",
           "WEIGHT_SUFFIXES"]


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

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def _transforms(model: torch.nn.Module) -> tuple[Callable, Callable]:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    train = image_transform_v2(cfg, is_train=True)
    val = image_transform_v2(cfg, is_train=False)
    return train, val


def create_model(name: str, pretrained: str = "", seed: int = 0,
                 device: str | torch.device = "cpu") -> ClipModel:
    """Build ``name`` with weights from ``pretrained``.

    ``pretrained`` is an open_clip tag (``openai``, downloaded and cached by open_clip), weights
    on the Hugging Face Hub (``hf-hub:org/name``), a local ``.safetensors``/``.pt`` file (read with
    ``weights_only``: no pickled code runs), or empty for a seeded random initialisation (logged as
    a warning). An ``hf-hub:org/name`` model name brings its own weights (``pretrained`` empty).
    Offline, weights that are not cached are one line of error at once (:mod:`clipid.models.hub`).
    """
    get_model_config(name)  # a clear error for an unknown architecture
    if is_hub_name(name):  # config and weights both from the hub repo, as open_clip does it
        with hub_access("model.name", name):
            model = open_clip.create_model(name, device=device)
        weights = name
    elif is_hub_name(pretrained):
        with hub_access("model.pretrained", name, pretrained):
            from open_clip.pretrained import download_pretrained_from_hf

            path = download_pretrained_from_hf(hub_repo(pretrained))
        model = _load_weight_file(name, Path(path), device)
        weights = pretrained
    elif not pretrained:
        log.warning("model.pretrained is empty: %s starts from RANDOM weights (seed %d)",
                    name, seed)
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None, device=device)
        weights = "random"
    elif looks_like_weight_file(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"model.pretrained: weight file '{path}' not found")
        model = _load_weight_file(name, path, device)
        weights = str(path)
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ModelLoadError(f"model.pretrained: '{pretrained}' is not a pretrained tag of "
                                 f"{name} (tags: {', '.join(tags) or 'none'}) nor a weight file")
        try:
            with hub_access("model.pretrained", name, pretrained):
                model = open_clip.create_model(name, pretrained=pretrained, device=device)
        except HubUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
            raise ModelLoadError(
                f"model.pretrained: could not get the '{pretrained}' weights of {name} (is this "
                f"machine offline?): {str(exc).splitlines()[0]}\nOn a machine with internet, "
                f"open_clip.create_model('{name}', pretrained='{pretrained}') caches them under "
                "~/.cache/huggingface; or save the weights as a .safetensors/.pt file and set "
                "model.pretrained to its path.") from exc
        weights = pretrained
    model.eval()
    train, val = _transforms(model)
    return ClipModel(model, train, val, open_clip.get_tokenizer(name), name, weights)


def _load_weight_file(name: str, path: Path, device: str | torch.device) -> torch.nn.Module:
    try:
        model = open_clip.create_model(name, pretrained=None, device=device)
        open_clip.load_checkpoint(model, str(path), weights_only=True, device=str(device))
    except (RuntimeError, KeyError, ValueError, OSError, pickle.UnpicklingError) as exc:
        raise ModelLoadError(f"model.pretrained: cannot load '{path}' into {name}: "
                             f"{str(exc).splitlines()[0]}") from exc
    return model


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> ClipModel:
    """A model saved by clipid: the architecture from the sidecar, the weights from safetensors."""
    state, meta = load_checkpoint(checkpoint)
    name = meta["architecture"]
    # open_clip warns "initialized randomly" here; the checkpoint's weights follow at once.
    logging.disable(logging.WARNING)
    try:
        # An hf-hub: architecture: its config from the hub (cache), not its weights.
        with hub_access("model.name", name):
            model = open_clip.create_model(name, pretrained=None, device=device,
                                           load_weights=not is_hub_name(name))
    finally:
        logging.disable(logging.NOTSET)
    clip_state = {k: v for k, v in state.items() if not k.startswith("heads.")}
    model.load_state_dict(clip_state, strict=True)
    model.eval()
    train, val = _transforms(model)
    return ClipModel(model, train, val, open_clip.get_tokenizer(name), name, str(checkpoint), meta)
