"""One preprocessing and one image embedding for every consumer: a checkpoint with CLIP-ReID's
geometry (non-square, overlapping patches, mean/std 0.5) and the concat feature embeds the same
in evaluation/index (``clipid.features``), search/serve (``embed_pil``), the MLflow Model's
pyfunc and the ONNX export."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from clipid.deploy.onnx import export_model
from clipid.deploy.preprocessing import model_card
from clipid.deploy.pyfunc import ClipidEmbedder, weights_file
from clipid.features import image_features, text_features
from clipid.models.checkpoint import save_checkpoint
from clipid.models.factory import create_model, load_model
from clipid.models.geometry import ModelSpec
from clipid.models.visual import encode_image_parts, text_space
from clipid.search.query import embed_pil

from conftest import draw

SPEC = ModelSpec(image_size=(96, 48), patch_stride=6, mean=(0.5,) * 3, std=(0.5,) * 3,
                 embedding="concat")


def test_geometry_and_concat_feature_are_the_same_in_every_consumer(tmp_path: Path) -> None:
    import onnxruntime

    clip = create_model("clipid-vit-tiny", seed=1, spec=SPEC)
    weights = save_checkpoint(clip.model.state_dict(), tmp_path / "stage2" / "model.safetensors",
                              {**clip.sidecar(), "stage": "stage2"})
    loaded = load_model(weights)
    paths = [draw(tmp_path / "a.png", 1, (40, 90)), draw(tmp_path / "b.jpg", 2, (64, 96))]
    features = image_features(loaded.model, paths, loaded.preprocess_val).numpy()
    assert features.shape == (2, 192 + 128)

    served = np.concatenate([embed_pil(loaded, Image.open(p).convert("RGB")) for p in paths])
    np.testing.assert_allclose(served, features, atol=1e-6)

    folder = tmp_path / "pyfunc"
    weights_file(loaded, folder)
    card = model_card(loaded.model, loaded.architecture, "stage2", has_text=True)
    assert card["preprocess"]["size"] == [96, 48] and card["preprocess"]["resize_mode"] == "squash"
    (folder / "card.json").write_text(json.dumps(card))
    embedder = ClipidEmbedder()
    embedder.load_context(SimpleNamespace(artifacts={"clip": str(folder)}))
    frame = pd.DataFrame({"image": [p.read_bytes() for p in paths] + [b""],
                          "text": ["", "", "a red shirt"]})
    out = embedder.predict(None, frame)
    np.testing.assert_allclose(out[:2], features, atol=1e-6)
    text = text_features(loaded.model, loaded.tokenizer, ["a red shirt"]).numpy()
    np.testing.assert_allclose(out[2], np.concatenate([np.zeros(192), text[0]]), atol=1e-6)

    files = export_model(loaded, "stage2", tmp_path / "onnx")
    assert json.loads(files[-1].read_text())["preprocess"] == card["preprocess"]
    batch = torch.stack([loaded.preprocess_val(Image.open(p).convert("RGB")) for p in paths])
    session = onnxruntime.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": batch.numpy()})[0]
    np.testing.assert_allclose(got, features, atol=1e-4)

    # Texts rank a concat gallery by its projected part: exactly CLIP's unit embedding.
    with torch.no_grad():
        proj = F.normalize(encode_image_parts(loaded.model, batch).proj, dim=-1).numpy()
    np.testing.assert_allclose(text_space(features, 128), proj, atol=1e-6)
