"""SIE and CLIP-ReID's geometry through a stage: cameras from the manifest into the training
batches and the evaluation pass, the camera embedding trained, saved and rebuilt by the loader."""

from __future__ import annotations

import pytest
import torch

from clipid.config import params_from_dict
from clipid.data.dataset import PreparedData
from clipid.evaluation import evaluate
from clipid.features import image_features
from clipid.models.checkpoint import load_checkpoint
from clipid.models.factory import load_model
from clipid.models.visual import add_camera_embedding
from clipid.training.engine import Trainer

from conftest import prepare_data, workspace_over

MODEL = {"sie": True, "sie_coe": 2.0, "image_size": [64, 32], "patch_stride": 6,
         "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "embedding": "concat"}


@pytest.mark.slow
def test_sie_stage_trains_saves_loads_and_evaluates_with_cameras(tmp_path) -> None:
    params = params_from_dict({
        "data": {"synthetic": {"items": 12, "views": 4, "image_size": 48}, "cache_size": 32,
                 "workers": 0},
        "model": MODEL,
        "train": {"epochs": 1, "batch_size": 8, "pk_k": 2, "log_every": 1, "workers": 0},
    })
    prepared = prepare_data(params, tmp_path / "data")
    trainer = Trainer(params, "stage2", device=torch.device("cpu"),
                      workspace=workspace_over(prepared, tmp_path / "run"))
    checkpoint = trainer.fit().checkpoint
    state, meta = load_checkpoint(checkpoint)
    data = PreparedData.load(prepared)
    cameras = sorted(data.rows("train")["camera"].unique().tolist())
    assert meta["model"]["sie_cameras"] == cameras and len(cameras) > 1
    assert meta["model"]["image_size"] == [64, 32] and meta["model"]["embedding"] == "concat"

    # The camera embedding trained from its seeded truncated-normal start.
    start = torch.nn.Module()
    start.visual = torch.nn.Module()
    start.visual.class_embedding = torch.zeros(192)
    add_camera_embedding(start, len(cameras), 2.0,
                         torch.Generator().manual_seed(params.train.seed))
    assert state["visual.sie_embed"].shape == (len(cameras), 192)
    assert not torch.equal(state["visual.sie_embed"], start.visual.sie_embed.detach())

    clip = load_model(checkpoint)
    assert clip.spec.sie_cameras == tuple(cameras) and clip.spec.sie_coe == 2.0
    test = data.table[data.table["split"] != "train"].head(4)
    paths = [data.root / p for p in test["image"]]
    rows = clip.spec.camera_indices(test["camera"].tolist())
    with_cameras = image_features(clip.model, paths, clip.preprocess_val, cameras=rows)
    without = image_features(clip.model, paths, clip.preprocess_val)
    assert with_cameras.shape == (4, 192 + 128)
    assert not torch.allclose(with_cameras, without)
    result = evaluate(clip, data, params.eval)
    assert result is not None and 0 <= result.metrics["i2i"]["mAP"] <= 100
