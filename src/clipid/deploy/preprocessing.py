"""What a model needs around its weights, as plain JSON: the image preprocessing and the
tokenizer. The pyfunc and the ONNX export both carry it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from clipid.models import text_context_length
from clipid.models.geometry import eval_transform
from clipid.models.visual import embedding_dim, embedding_kind

__all__ = ["image_transform", "model_card"]


def model_card(model: torch.nn.Module, architecture: str, stage: str,
               has_text: bool) -> dict[str, Any]:
    """Architecture, image embedding and its width, preprocessing (size, mean, std,
    interpolation, resize mode: the model's geometry) and the tokenizer's context length:
    everything but the weights, no paths, no run ids."""
    cfg = dict(model.visual.preprocess_cfg)
    preprocess = {key: list(value) if isinstance(value, tuple) else value
                  for key, value in cfg.items()}
    card: dict[str, Any] = {"architecture": architecture, "stage": stage,
                            "embed_dim": embedding_dim(model), "embedding": embedding_kind(model),
                            "proj_dim": int(model.visual.output_dim),
                            "preprocess": preprocess}
    if has_text:
        card["tokenizer"] = {"kind": "open_clip", "architecture": architecture,
                             "context_length": text_context_length(architecture)}
    return card


def image_transform(card: dict[str, Any]) -> Callable:
    """The evaluation transform of ``card["preprocess"]``: built by the one function that
    ``clipid.models.factory`` uses too, so embeddings match ``clipid.features``."""
    return eval_transform(card["preprocess"])
