"""The training engine: frozen towers, checkpoint chaining, exact resume, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipid.config import Params, params_from_dict
from clipid.errors import ClipidError
from clipid.models.checkpoint import load_checkpoint
from clipid.models.factory import create_model, load_model
from clipid.training.engine import Trainer
from clipid.training.towers import tower_of

from conftest import Interrupt, kill_in_second_epoch, prepare_data, workspace_over

CPU = torch.device("cpu")


def micro_params(**stages: dict) -> Params:
    raw = {
        "data": {"synthetic": {"items": 12, "views": 4, "image_size": 48}, "cache_size": 32,
                 "workers": 0},
        "train": {"epochs": 2, "batch_size": 8, "pk_k": 2, "log_every": 1, "workers": 0},
        **stages,
    }
    return params_from_dict(raw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    params = micro_params()
    return prepare_data(params, out)


def fit(params: Params, stage: str, prepared: Path, root: Path, **kwargs) -> Path:
    trainer = Trainer(params, stage, device=CPU, workspace=workspace_over(prepared, root),
                      **kwargs)
    return trainer.fit().checkpoint


def towers(state: dict[str, torch.Tensor], tower: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("heads.") and tower_of(k) == tower}


@pytest.mark.slow
def test_stage2_trains_the_image_tower_against_a_bit_identical_text_tower(prepared, tmp_path):
    params = micro_params()
    checkpoint = fit(params, "stage2", prepared, tmp_path)
    trained, meta = load_checkpoint(checkpoint)
    start = create_model(params.model.name, params.model.pretrained, seed=params.train.seed)
    before = start.model.state_dict()
    for key, value in towers(trained, "text").items():
        assert torch.equal(value, before[key]), f"frozen text weight {key} changed"
    changed = [k for k, v in towers(trained, "image").items() if not torch.equal(v, before[k])]
    assert len(changed) > 0.9 * len(towers(trained, "image"))
    assert meta["stage"] == "stage2" and meta["epochs"] == 2 and len(meta["history"]) == 2
    assert meta["params"]["train.lr"] == params.train.lr


@pytest.mark.slow
def test_stages_chain_by_checkpoint_and_stage4_keeps_its_heads_apart(prepared, tmp_path):
    params = micro_params(stage2={"epochs": 1}, stage3={"epochs": 1}, stage4={"epochs": 1})
    for stage in ("stage2", "stage3", "stage4"):
        fit(params, stage, prepared, tmp_path)
    models = tmp_path / "models"
    s2, _ = load_checkpoint(models / "stage2" / "model.safetensors")
    s3, meta3 = load_checkpoint(models / "stage3" / "model.safetensors")
    s4, meta4 = load_checkpoint(models / "stage4" / "model.safetensors")
    assert meta3["parent"] == str(models / "stage2" / "model.safetensors")
    assert meta4["parent"] == str(models / "stage3" / "model.safetensors")
    assert meta3["parent_sha256"] and len(meta3["parent_sha256"]) == 64
    # Stage 3 trains both towers; Stage 4 only the image tower, from Stage 3's weights.
    assert any(not torch.equal(v, s2[k]) for k, v in towers(s3, "text").items())
    assert all(torch.equal(v, s3[k]) for k, v in towers(s4, "text").items())
    assert any(k.startswith("heads.") for k in s4)
    assert not any(k.startswith("heads.") for k in s3)
    loaded = load_model(models / "stage4" / "model.safetensors")
    assert not any(k.startswith("heads.") for k in loaded.model.state_dict())


@pytest.mark.slow
def test_a_killed_stage_resumes_to_the_same_weights(prepared, tmp_path):
    params = micro_params(stage4={"init": "stage1", "center_weight": 0.001})
    reference, _ = load_checkpoint(fit(params, "stage4", prepared, tmp_path / "straight"))

    root = tmp_path / "killed"
    with pytest.raises(Interrupt):
        fit(params, "stage4", prepared, root, on_log=kill_in_second_epoch())
    assert (root / ".clipid" / "resume" / "stage4").is_dir()
    assert not (root / "models" / "stage4" / "model.safetensors").exists()

    steps: list[int] = []
    checkpoint = fit(params, "stage4", prepared, root, on_log=lambda m, s: steps.append(s))
    resumed, meta = load_checkpoint(checkpoint)
    assert min(steps) > 1, "the rerun started from scratch instead of resuming"
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), f"{key} differs after resume"
    assert len(meta["history"]) == 2
    assert not (root / ".clipid" / "resume" / "stage4").exists()


@pytest.mark.slow
def test_a_resume_state_of_other_params_is_ignored(prepared, tmp_path):
    with pytest.raises(Interrupt):
        fit(micro_params(), "stage2", prepared, tmp_path, on_log=kill_in_second_epoch())
    other = micro_params(train={"lr": 2e-3, "epochs": 2, "batch_size": 8, "pk_k": 2,
                                "log_every": 1})
    steps: list[int] = []
    fit(other, "stage2", prepared, tmp_path, on_log=lambda m, s: steps.append(s))
    assert min(steps) == 1, "a state saved under other params was resumed"


@pytest.mark.parametrize(("stage", "spec", "message"), [
    ("stage2", {"train_image": False}, "both false"),
    ("stage2", {"train_text": True, "loss": "none", "id_weight": 1.0}, "train_text needs"),
    ("stage3", {"init": "stage3"}, "cannot start from itself"),
])
def test_inconsistent_stage_descriptions_are_refused(prepared, tmp_path, stage, spec, message):
    with pytest.raises(ClipidError, match=message):
        Trainer(micro_params(**{stage: spec}), stage, device=CPU,
                workspace=workspace_over(prepared, tmp_path))
