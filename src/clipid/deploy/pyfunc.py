"""The MLflow Model of a stage: a ``pyfunc`` that embeds images or texts.

It holds the weights (safetensors and sidecar), the preprocessing and the tokenizer spec
(``card.json``); its code is the installed clipid package (no ``code_paths``: the model is served
from the project's environment with ``--env-manager local`` and installs nothing).

Input: a DataFrame with an ``image`` column (image file bytes, raw or base64) and/or a ``text``
column; each row fills exactly one (the other empty or missing). Output: one L2-normalised
float32 embedding per row, the same numbers ``clipid.features`` gives. Images are decoded as
``clipid serve`` decodes an upload (:func:`clipid.data.images.decode_rgb`): refused over
``serve.max_pixels``'s default by their header, decoded no larger than the model needs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from clipid.config import ServeParams
from clipid.data.images import (
    ImageRejected,
    ImageTooLarge,
    decode_rgb,
    return_large_images_to_the_os,
)
from clipid.deploy.preprocessing import image_transform, model_card
from clipid.errors import ClipidError
from clipid.models.checkpoint import file_sha256, save_checkpoint
from clipid.models.factory import ClipModel
from clipid.models.visual import image_embedding

try:  # mlflow is a dependency, but importing it costs seconds: only the pyfunc needs it
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[misc,assignment]

__all__ = ["ARTIFACT_PATH", "ClipidEmbedder", "save_pyfunc", "weights_file"]

ARTIFACT_PATH = "model"          # the MLflow Model's folder in its run's artifacts
WEIGHTS = "model.safetensors"
BATCH = 64                       # rows per forward pass
MAX_PIXELS = ServeParams().max_pixels  # served outside the project: serve.max_pixels's default


def weights_file(clip: ClipModel, folder: Path) -> Path:
    """The model's weights as a checkpoint in ``folder``: a copy of the stage's checkpoint, or,
    for the pretrained model (no checkpoint), its state written the way checkpoints are."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / WEIGHTS
    source = Path(clip.weights)
    if clip.metadata and source.suffix == ".safetensors" and source.is_file():
        shutil.copyfile(source, target)
        target.with_suffix(".json").write_text(json.dumps(clip.metadata, indent=2,
                                                          sort_keys=True, default=str) + "\n")
        return target
    return save_checkpoint(clip.model.state_dict(), target,
                           {**clip.sidecar(), "weights": clip.weights})


def _image(value: Any, need: Any) -> Image.Image:
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    with contextlib.suppress(binascii.Error, ValueError):  # raw image bytes are never base64
        raw = base64.b64decode(b"".join(raw.split()), validate=True)  # MIME base64 has newlines
    try:
        return decode_rgb(io.BytesIO(raw), max_pixels=MAX_PIXELS, need=need)
    except ImageTooLarge as exc:
        raise ClipidError(f"column 'image': {exc} (the default of clipid's serve.max_pixels)") \
            from None
    except ImageRejected as exc:
        raise ClipidError(f"column 'image': not a readable image ({exc})") from None


def _present(value: Any) -> bool:
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return False  # None, NaN, pd.NA: a frame's empty cells
    return not (isinstance(value, (str, bytes)) and len(value) == 0)


class ClipidEmbedder(PythonModel):
    """``predict`` embeds the ``image`` or the ``text`` of every row."""

    def load_context(self, context: Any) -> None:
        from clipid.models.factory import load_model

        return_large_images_to_the_os()
        folder = Path(context.artifacts["clip"])
        self.card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
        self.clip = load_model(folder / WEIGHTS)
        self.transform = image_transform(self.card)

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> np.ndarray:
        frame = pd.DataFrame(model_input)
        unknown = set(frame.columns) - {"image", "text"}
        if unknown or frame.empty:
            raise ClipidError("input: a DataFrame with an 'image' and/or a 'text' column "
                              f"(got columns {sorted(map(str, frame.columns))})")
        images = frame["image"].tolist() if "image" in frame else [None] * len(frame)
        texts = frame["text"].tolist() if "text" in frame else [None] * len(frame)
        image_rows, text_rows = [], []
        for row, (image, text) in enumerate(zip(images, texts, strict=True)):
            if _present(image) == _present(text):
                raise ClipidError(f"input row {row}: give exactly one of 'image' and 'text'")
            (image_rows if _present(image) else text_rows).append(row)
        out = np.zeros((len(frame), int(self.card["embed_dim"])), dtype=np.float32)
        if image_rows:
            out[image_rows] = self.embed_images([images[i] for i in image_rows])
        if text_rows:
            embedded = self.embed_texts([str(texts[i]) for i in text_rows])
            # A concat model's texts fill the projected part's place (the zeros before it
            # never score): texts meet images in CLIP's own space.
            out[text_rows, out.shape[1] - embedded.shape[1]:] = embedded
        return out

    @torch.inference_mode()
    def embed_images(self, values: list[Any]) -> np.ndarray:
        model = self.clip.model.eval()
        chunks = []
        for start in range(0, len(values), BATCH):
            batch = torch.stack([self.transform(_image(v, self.card["preprocess"]["size"]))
                                 for v in values[start:start + BATCH]])
            chunks.append(F.normalize(image_embedding(model, batch).float(), dim=-1).numpy())
        return np.concatenate(chunks)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        if "tokenizer" not in self.card:
            raise ClipidError(f"column 'text': the {self.card['stage']} model has no text tower")
        model = self.clip.model.eval()
        chunks = []
        for start in range(0, len(texts), BATCH):
            tokens = self.clip.tokenizer(texts[start:start + BATCH])
            chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1).numpy())
        return np.concatenate(chunks)


def _signature(embed_dim: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("binary", "image", required=False),
                     ColSpec("string", "text", required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _example(has_text: bool) -> pd.DataFrame:
    """A grey 8x8 PNG (and a caption): what MLflow shows and validates requests against."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, format="PNG")
    if not has_text:
        return pd.DataFrame({"image": [buffer.getvalue()]})
    # An empty value marks the absent one: MLflow's server can't decode a null binary cell.
    return pd.DataFrame({"image": [buffer.getvalue(), b""],
                         "text": ["", "a photo of a garment"]})


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in
            ("mlflow", "torch", "torchvision", "open_clip_torch", "pandas", "pillow",
             "safetensors")]


def save_pyfunc(clip: ClipModel, stage: str, path: Path, has_text: bool) -> str:
    """Write the MLflow Model of ``clip`` to ``path``; returns the SHA-256 of its weights (the
    key the registry finds a stage's version by)."""
    import mlflow.pyfunc

    card = model_card(clip.model, clip.architecture, stage, has_text)
    with tempfile.TemporaryDirectory(prefix="clipid-pyfunc-") as tmp:
        folder = Path(tmp) / "clip"
        weights = weights_file(clip, folder)
        (folder / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        mlflow.pyfunc.save_model(
            path=str(path), python_model=str(Path(__file__).with_name("_model_code.py")),
            artifacts={"clip": str(folder)}, input_example=_example(has_text),
            signature=_signature(card["embed_dim"]),
            pip_requirements=_requirements(),
            metadata={"clipid.stage": stage, "clipid.architecture": clip.architecture})
        return file_sha256(weights)
