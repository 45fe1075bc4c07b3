"""Training under DDP on CPU (gloo): ranks agree, and two processes learn what one does.

The engine's contract: a stage run by W processes with a global batch B is the same training
as one process with batch B (the samplers hand each rank its share of the same global batch,
the contrastive losses gather every rank's features, DDP averages gradients).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from clipid.config import Params, params_from_dict
from clipid.errors import ClipidError
from clipid.models.stages import model_for_stage
from clipid.runtime import autocast, grad_scaler, resolve_precision
from clipid.stages.launch import cli_launch_command, needs_launch
from clipid.training.engine import Trainer

from conftest import prepare_data, workspace_over

WORLD = 2
CPU = torch.device("cpu")


def ddp_params(**overrides: dict) -> dict:
    """The micro configuration with deterministic augmentation: a full-image crop, no flip and
    no erasing, so that one process and two see the very same pixels."""
    return {
        "data": {"synthetic": {"items": 16, "views": 4, "image_size": 48}, "cache_size": 32,
                 "workers": 0},
        "train": {"epochs": 2, "batch_size": 8, "pk_k": 2, "log_every": 1, "workers": 0, "lr": 1e-3,
                  "augment": {"flip": False, "crop_scale": 1.0, "random_erasing": 0.0}},
        "stage2": {"loss": "infonce"},
        **overrides,
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    params = params_from_dict(ddp_params())
    return prepare_data(params, out)


def _train(params: Params, stage: str, prepared: Path, root: Path) -> dict[str, torch.Tensor]:
    # Only rank 0 writes; every rank reads the checkpoint the previous stage wrote.
    trainer = Trainer(params, stage, device=CPU, workspace=workspace_over(prepared, root))
    trainer.fit()
    # Everything that trains: the model's weights under their own names, heads and centres.
    state = trainer.objective.state_dict()
    return {k.removeprefix("towers.model."): v.detach().clone() for k, v in state.items()}


def _worker(rank: int, store: str, raw: dict, stages: list[str], prepared: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        params = params_from_dict(raw)
        weights = {stage: _train(params, stage, Path(prepared), Path(out)) for stage in stages}
        torch.save(weights, f"{out}/weights.{rank}")
    finally:
        dist.destroy_process_group()


def _spawn(raw: dict, stages: list[str], prepared: Path, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(str(out / "store"), raw, stages, str(prepared), str(out)),
             nprocs=WORLD, join=True)
    return [torch.load(out / f"weights.{r}") for r in range(WORLD)]


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(prepared, tmp_path):
    raw = ddp_params(stage4={"init": "stage2", "epochs": 1})
    ranks = _spawn(raw, ["stage2", "stage4"], prepared, tmp_path / "ddp")

    assert any(k.startswith("terms.") for k in ranks[0]["stage4"]), "stage4 has a head"
    for stage in ("stage2", "stage4"):
        # DDP wraps the whole objective: every rank gets the same averaged gradient, for the
        # towers and for the BNNeck head and the centres alike, so the replicas never drift.
        for key, value in ranks[0][stage].items():
            if "running_" in key or "num_batches" in key:
                continue  # BatchNorm statistics: each rank's own batches (no SyncBN)
            assert torch.equal(value, ranks[1][stage][key]), f"{stage}: ranks differ at {key}"
    # Only rank 0 writes the checkpoint.
    assert (tmp_path / "ddp" / "models" / "stage2" / "model.safetensors").is_file()

    # One process with the same global batch: the same training, up to the order of float sums.
    single = _train(params_from_dict(raw), "stage2", prepared, tmp_path / "single")
    start = model_for_stage(params_from_dict(raw), "stage1", CPU,
                            workspace_over(prepared, tmp_path / "unused")).model.state_dict()
    # Adam divides by the gradient's magnitude, so a parameter whose gradient is float noise
    # moves by noise: compare the whole update, not each weight.
    gap = sum(float((ranks[0]["stage2"][k] - v).square().sum()) for k, v in single.items())
    moved = sum(float((v - start[k]).square().sum()) for k, v in single.items())
    assert moved > 1e-2, "the comparison must be between trained weights"
    assert gap < 1e-4 * moved, f"DDP update differs from one process's: {gap / moved:.2e}"


def test_the_train_command_launches_itself_under_torchrun(prepared, tmp_path, monkeypatch):
    params = params_from_dict(ddp_params(train={"nproc": 2, "batch_size": 8}))
    assert needs_launch(params)
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside torchrun: train here, don't launch again
    assert not needs_launch(params)
    command = cli_launch_command(params, ["train", "stage2"], Path("params.yaml"))
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in command and command[-4:-2] == ["train", "stage2"]


@pytest.mark.slow
def test_a_stage_runs_under_torchrun_with_train_nproc(prepared, tmp_path):
    """``clipid train stage2`` with ``train.nproc: 2``: two processes, one checkpoint and one
    MLflow run, written by rank 0."""
    work = tmp_path / "ws"
    (work / "data").mkdir(parents=True)
    (work / "data" / "prepared").symlink_to(prepared)
    raw = ddp_params()
    raw["train"] = {**raw["train"], "nproc": WORLD, "epochs": 1}
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["DVC_ROOT"] = str(work)
    done = subprocess.run([sys.executable, "-m", "clipid", "train", "stage2"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.distributed.run" in done.stderr
    meta = json.loads((work / "models" / "stage2" / "model.json").read_text())
    assert meta["params"]["train.nproc"] == WORLD and len(meta["history"]) == 1
    with sqlite3.connect(work / "mlflow.db") as db:
        runs = db.execute("SELECT run_uuid FROM runs WHERE name = 'stage2'").fetchall()
        nproc = db.execute("SELECT value FROM params WHERE key = 'train.nproc'").fetchall()
    assert len(runs) == 1 and nproc == [(str(WORLD),)]


@pytest.mark.slow
def test_cuda_only_options_are_ignored_on_cpu(prepared, tmp_path, caplog):
    """Mixed precision, channels-last and compile are CUDA features: the same params train
    bit-identically in fp32 on CPU, with a warning instead of an error."""
    plain = params_from_dict(ddp_params(stage2={"epochs": 1}))
    fancy = params_from_dict(ddp_params(
        stage2={"epochs": 1},
        train={**ddp_params()["train"], "precision": "fp16", "channels_last": True,
               "compile": True}))
    reference = _train(plain, "stage2", prepared, tmp_path / "fp32")
    with caplog.at_level("WARNING"):
        ignored = _train(fancy, "stage2", prepared, tmp_path / "fp16")
    for key, value in reference.items():
        assert torch.equal(value, ignored[key]), key
    warned = caplog.text
    assert "train.precision=fp16" in warned and "train.channels_last" in warned \
        and "train.compile" in warned


def test_precision_helpers():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu, "eval.precision") == torch.float32
    assert resolve_precision("bf16", cpu, "eval.precision") == torch.float32  # CUDA only
    with pytest.raises(ClipidError, match="eval.precision"):
        resolve_precision("fp8", cpu, "eval.precision")
    # Loss scaling is for fp16 only: bf16 has fp32's exponent range.
    assert grad_scaler(torch.float16, cpu).is_enabled()
    assert not grad_scaler(torch.bfloat16, cpu).is_enabled()
    a = torch.randn(4, 4)
    with autocast(cpu, torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(cpu, torch.float32):
        assert (a @ a).dtype == torch.float32
