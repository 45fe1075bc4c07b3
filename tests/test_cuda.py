"""The CUDA paths (issue 7): mixed-precision training, channels-last, torch.compile and
half-precision feature extraction. Skipped where no GPU is present (CI); run on a GPU machine
with ``pytest tests/test_cuda.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipid.config import params_from_dict
from clipid.data.dataset import PreparedData
from clipid.features import image_features
from clipid.models.checkpoint import load_checkpoint
from clipid.models.factory import create_model
from clipid.training.engine import Trainer

from conftest import prepare_data, workspace_over

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def micro(**train: object) -> dict:
    return {"data": {"synthetic": {"items": 16, "views": 4, "image_size": 48}, "cache_size": 32,
                     "workers": 0},
            "train": {"epochs": 2, "batch_size": 8, "pk_k": 2, "log_every": 1, "workers": 0,
                      **train},
            "stage4": {"init": "stage1"}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cuda")
    params = params_from_dict(micro())
    return prepare_data(params, out)


@pytest.mark.parametrize("options", [
    {"precision": "bf16"},
    {"precision": "fp16"},                       # autocast + GradScaler
    {"precision": "bf16", "channels_last": True},
    {"precision": "fp32", "compile": True},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("stage", ["stage2", "stage4"])
def test_training_on_cuda_learns_with_finite_losses(prepared, tmp_path, stage, options):
    params = params_from_dict({**micro(**options), stage: {"init": "stage1"}})
    logged: list[dict[str, float]] = []
    trainer = Trainer(params, stage, device=CUDA, workspace=workspace_over(prepared, tmp_path),
                      on_log=lambda m, s: logged.append(m))
    result = trainer.fit()
    losses = [m["train/loss"] for m in logged if "train/loss" in m]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    state, meta = load_checkpoint(result.checkpoint)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    # The weights moved: an optimiser step was taken (fp16's scaler skips only inf steps).
    init = create_model(params.model.name, "", seed=params.train.seed,
                        device=CUDA).model.cpu().state_dict()
    moved = [k for k, v in init.items() if k in state and not torch.equal(v, state[k])]
    assert moved, "no weight changed"
    assert meta["params"]["train.precision"] == options["precision"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_match_fp32(prepared, dtype):
    clip = create_model("clipid-vit-tiny", "", seed=0, device=CUDA)
    data = PreparedData.load(prepared, with_texts=False)
    paths = data.paths(data.rows("gallery"))
    full = image_features(clip.model, paths, clip.preprocess_val, device=CUDA)
    half = image_features(clip.model, paths, clip.preprocess_val, device=CUDA, dtype=dtype)
    assert half.dtype == torch.float32
    cosine = F.cosine_similarity(full, half, dim=-1)
    assert cosine.min() > 0.99, cosine.min()
