"""Lineage: a checkpoint's weights lead, by SHA-256, to the MLflow runs that made them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipid.config import Params
from clipid.errors import ClipidError
from clipid.lineage import checkpoint_tags, lineage_lines, resolve_checkpoint
from clipid.models.checkpoint import file_sha256
from clipid.tracking import Tracker, mlflow_client, tracking_uri

from conftest import client, git_commit


def fake_checkpoint(root: Path, stage: str, payload: bytes, parent: Path | None) -> Path:
    weights = root / "models" / stage / "model.safetensors"
    weights.parent.mkdir(parents=True)
    # A valid safetensors file, but no CLIP model in it: the tracker uploads it as the file.
    save_file({"payload": torch.tensor(list(payload), dtype=torch.uint8)}, str(weights))
    meta = {"architecture": "clipid-vit-tiny", "stage": stage,
            "parent": str(parent) if parent else "random",
            "parent_sha256": file_sha256(parent) if parent else None}
    weights.with_suffix(".json").write_text(json.dumps(meta))
    return weights


def test_runs_tag_their_weights_and_parent_and_the_line_is_followed_back(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = git_commit(store)
    stage2 = fake_checkpoint(store, "stage2", b"weights two", None)
    stage3 = fake_checkpoint(store, "stage3", b"weights three", stage2)
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-wren")
    run_ids = {}
    for stage, weights in (("stage2", stage2), ("stage3", stage3)):
        with Tracker(stage=f"train_{stage}", params=Params(), run_name=stage) as tracker:
            tracker.log_checkpoint(weights, 1.5)
            run_ids[stage] = tracker.run_id
    tags = client(store).get_run(run_ids["stage3"]).data.tags
    assert tags == {**tags, **checkpoint_tags(stage3)}
    assert tags["clipid.checkpoint.sha256"] == file_sha256(stage3)
    assert tags["clipid.parent.sha256"] == file_sha256(stage2)

    # The evaluation finds the training run by the weights' hash (no run id in the sidecar).
    with Tracker(stage="evaluate@stage3", params=Params(), checkpoint=stage3) as tracker:
        assert tracker.run_id == run_ids["stage3"]
        tracker.log_metrics({"eval/i2i/mAP": 0.25})
    assert client(store).get_run(run_ids["stage3"]).data.metrics["eval/i2i/mAP"] == 0.25

    lines, found = lineage_lines(mlflow_client(tracking_uri()), file_sha256(stage3),
                                 str(stage3))
    text = "\n".join(lines)
    assert found
    assert run_ids["stage3"] in text and run_ids["stage2"] in text
    assert text.index(run_ids["stage3"]) < text.index(run_ids["stage2"])
    assert text.count("dvc exp     brisk-wren") == 2 and text.count(commit) == 2
    assert "(brisk-wren/stage3, FINISHED" in text  # the run, named after its experiment
    assert "experiment  clipid" in text and "start of the line" in text

    other = fake_checkpoint(store, "stage4", b"never tracked", None)
    lines, found = lineage_lines(mlflow_client(tracking_uri()), file_sha256(other), str(other))
    assert not found and "no run in the store" in "\n".join(lines)


def test_clipreid_sidecars_name_their_parent_and_prompts(tmp_path: Path) -> None:
    init = fake_checkpoint(tmp_path, "stage2", b"init", None)
    prompts = tmp_path / "prompts.safetensors"
    prompts.write_bytes(b"ctx")
    prompts.with_suffix(".json").write_text(json.dumps({
        "prompts": "learned", "init_model": {"weights": str(init), "sha256": file_sha256(init)}}))
    assert checkpoint_tags(prompts)["clipid.parent.sha256"] == file_sha256(init)
    image = tmp_path / "image.safetensors"
    image.write_bytes(b"image")
    image.with_suffix(".json").write_text(json.dumps({
        "parent": "random", "parent_sha256": None,
        "prompts": {"checkpoint": str(prompts), "sha256": file_sha256(prompts)}}))
    tags = checkpoint_tags(image)
    assert tags["clipid.prompts.sha256"] == file_sha256(prompts)
    assert "clipid.parent.sha256" not in tags and tags["clipid.parent"] == "random"


def test_a_checkpoint_is_named_by_file_folder_or_stage(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    weights = fake_checkpoint(tmp_path, "stage2", b"w", None)
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(weights) == weights
    assert resolve_checkpoint(weights.parent) == weights
    assert resolve_checkpoint("stage2").resolve() == weights
    with pytest.raises(ClipidError, match="stage9"):
        resolve_checkpoint("stage9")
    with pytest.raises(ClipidError, match="not a clipid checkpoint"):
        resolve_checkpoint(weights.with_suffix(".json"))


def test_lineage_of_stage1_names_the_pretrained_model_and_its_runs(
        store: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipid.cli import main

    params_file = store / "params.yaml"
    params_file.write_text("model:\n  name: clipid-vit-tiny\n  pretrained: ''\n")
    monkeypatch.chdir(store)
    assert main(["lineage", "stage1", "--params", str(params_file)]) == 2
    assert "no run in the store evaluated clipid-vit-tiny with random weights" in \
        capsys.readouterr().out
    with Tracker(stage="evaluate_stage1", params=Params(), run_name="stage1") as tracker:
        run_id = tracker.run_id
    with Tracker(stage="evaluate@stage2", params=Params(), run_name="stage2"):
        pass
    assert main(["lineage", "stage1", "--params", str(params_file)]) == 0
    out = capsys.readouterr().out
    assert "stage1  clipid-vit-tiny, random weights (seed 0): no checkpoint of its own" in out
    assert run_id in out and out.count("  run  ") == 1  # Stage 1's evaluation, not stage2's


def test_lineage_imports_neither_torch_nor_open_clip() -> None:
    # Most of what `clipid lineage` took was importing torch and open_clip it never used.
    code = ("import sys, clipid.cli, clipid.lineage, clipid.tracking, clipid.tracking_spool; "
            "print(sorted({'torch', 'open_clip'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
