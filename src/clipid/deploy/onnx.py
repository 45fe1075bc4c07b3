"""ONNX export of a stage's towers: ``image.onnx`` (and ``text.onnx`` where the model has a text
tower), each with a dynamic batch axis and L2-normalised outputs, plus ``model.json`` with the
preprocessing and the tokenizer's context length.

The exporter is torch's TorchScript-based one (``dynamo=False``): it needs no onnxscript, takes
``dynamic_axes`` directly, and writes the same bytes for the same weights (checked by the tests
and by the ``export`` stage's DVC hash); the graph is traced with fixed, seeded inputs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from clipid.deploy.preprocessing import model_card
from clipid.models.factory import ClipModel
from clipid.models.visual import image_embedding

__all__ = ["OPSET", "ImageEncoder", "TextEncoder", "export_model"]

OPSET = 17
CARD = "model.json"


class ImageEncoder(torch.nn.Module):
    """``(B, 3, H, W)`` preprocessed images -> ``(B, D)`` unit embeddings."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(image_embedding(self.model, image).float(), dim=-1)


class TextEncoder(torch.nn.Module):
    """``(B, context_length)`` int64 tokens -> ``(B, D)`` unit embeddings."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def _export(module: torch.nn.Module, example: torch.Tensor, name: str, path: Path) -> None:
    # Traced with autograd on: under no_grad, nn.MultiheadAttention takes its fused fast path
    # (aten::_native_multi_head_attention), which has no ONNX symbolic.
    with warnings.catch_warnings(), torch.enable_grad():
        # The TorchScript exporter is deprecated in favour of dynamo (see the module docstring);
        # open_clip's argmax indexing of the end token warns about negative indices it never uses.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=False,
                          input_names=[name], output_names=["embedding"],
                          dynamic_axes={name: {0: "batch"}, "embedding": {0: "batch"}},
                          opset_version=OPSET, do_constant_folding=True)


def export_model(clip: ClipModel, stage: str, out: Path) -> list[Path]:
    """Write ``image.onnx``, ``text.onnx`` (with a text tower) and ``model.json`` into ``out``."""
    from clipid.search.query import has_text_tower

    out.mkdir(parents=True, exist_ok=True)
    model = clip.model.to("cpu").eval()
    has_text = has_text_tower(model)
    card = model_card(model, clip.architecture, stage, has_text)
    generator = torch.Generator().manual_seed(0)
    size = card["preprocess"]["size"]
    height, width = (size, size) if isinstance(size, int) else size
    images = torch.randn(2, 3, height, width, generator=generator)
    written = [out / "image.onnx"]
    _export(ImageEncoder(model), images, "image", written[0])
    card["onnx"] = {"opset": OPSET, "image": {"file": "image.onnx", "input": "image",
                                              "shape": ["batch", 3, height, width]}}
    if has_text:
        tokens = clip.tokenizer(["a photo of a garment", "a red striped shirt"])
        written.append(out / "text.onnx")
        _export(TextEncoder(model), tokens, "text", written[1])
        card["onnx"]["text"] = {"file": "text.onnx", "input": "text", "dtype": "int64",
                                "shape": ["batch", int(tokens.shape[1])]}
    card["onnx"]["output"] = "embedding: (batch, embed_dim) float32, L2-normalised"
    (out / CARD).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [*written, out / CARD]
