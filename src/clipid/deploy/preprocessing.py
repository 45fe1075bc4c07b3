"""What a model needs around its weights, as plain JSON: the image preprocessing and the
tokenizer. The pyfunc and the ONNX export both carry it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from clipid.models import get_model_config, text_context_length

__all__ = ["image_transform", "model_card"]


def model_card(model: torch.nn.Module, architecture: str, stage: str,
               has_text: bool) -> dict[str, Any]:
    """Architecture, embedding width, preprocessing (size, mean, std, interpolation, ...) and
    the tokenizer's context length: everything but the weights, no paths, no run ids."""
    cfg = dict(model.visual.preprocess_cfg)
    preprocess = {key: list(value) if isinstance(value, tuple) else value
                  for key, value in cfg.items()}
    card: dict[str, Any] = {"architecture": architecture, "stage": stage,
                            "embed_dim": int(get_model_config(architecture)["embed_dim"]),
                            "preprocess": preprocess}
    if has_text:
        card["tokenizer"] = {"kind": "open_clip", "architecture": architecture,
                             "context_length": text_context_length(architecture)}
    return card


def image_transform(card: dict[str, Any]) -> Callable:
    """The evaluation transform of ``card["preprocess"]``: the same open_clip transform that
    ``clipid.models.factory`` builds, so embeddings match ``clipid.features``."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = {key: tuple(value) if isinstance(value, list) else value
           for key, value in card["preprocess"].items()}
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)
