"""MLflow tracking: where runs go, what they hold, and that tracking never stops the pipeline."""

from __future__ import annotations

import os
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from clipid.config import Params, flatten_params, params_from_dict
from clipid.tracking import Tracker, find_runs, store_root, tracking_uri, ui_command

from conftest import client, git_commit


def test_the_store_is_under_dvc_root(store: Path) -> None:
    assert store_root() == store.resolve()
    assert tracking_uri() == f"sqlite:///{store.resolve() / 'mlflow.db'}"
    assert ui_command(port=5123) == [
        "mlflow", "ui", "--backend-store-uri", tracking_uri(),
        "--default-artifact-root", str(store.resolve() / "mlruns"),
        "--host", "127.0.0.1", "--port", "5123", "--workers", "1"]


def test_without_dvc_root_the_store_is_the_enclosing_repository(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "sub" / "dir").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "sub" / "dir")
    assert store_root() == tmp_path.resolve()


def test_a_run_holds_params_metrics_tags_and_artifacts(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lark")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    params = params_from_dict({"train": {"lr": 1e-05}})
    artifact = store / "model.json"
    artifact.write_text("{}")
    with Tracker(stage="train_stage2", params=params, run_name="stage2",
                 tags={"owner": "test"}) as tracker:
        for step in (1, 2, 3):
            tracker.log_metrics({"train/loss": 1.0 / step, "bad name!": 2.0,
                                 "nan": float("nan"), "text": "oops"}, step=step)
        tracker.log_metrics({"train_seconds": 12.5})
        tracker.log_artifact(artifact, "checkpoint")
        tracker.log_dict({"a": 1}, "extra/info.json")
        run_id = tracker.run_id
    assert run_id is not None and tracker.run_id is None
    run = client(store).get_run(run_id)
    # A DVC experiment's run is named after it, under the experiment's parent run.
    assert run.info.status == "FINISHED" and run.info.run_name == "lucky-lark/stage2"
    parent = client(store).get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "lucky-lark"
    assert parent.data.tags["clipid.pipeline"] == run.data.tags["clipid.pipeline"]
    assert run.data.params["train.lr"] == "1e-05"
    assert run.data.params["stage2.loss"] == "supcon"
    assert run.data.params == {k: str(v) for k, v in flatten_params(params).items()}
    assert len(run.data.params) > 50  # more than one log_batch call would need at 100+
    history = client(store).get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert run.data.metrics["train_seconds"] == 12.5
    assert "bad name_" in run.data.metrics
    assert "nan" not in run.data.metrics and "text" not in run.data.metrics
    tags = run.data.tags
    assert tags["clipid.stage"] == "train_stage2" and tags["dvc.exp_name"] == "lucky-lark"
    assert tags["dvc.exp_baseline_rev"] == "a" * 40 and tags["owner"] == "test"
    assert tags["data.source"] == "synthetic" and tags["model.name"] == "clipid-vit-tiny"
    assert tags["model.pretrained"] == "random"
    assert [a.path for a in client(store).list_artifacts(run_id, "checkpoint")] == [
        "checkpoint/model.json"]
    # Artifacts live beside mlflow.db, whatever the working directory.
    assert (store / "mlruns" / run_id / "artifacts" / "checkpoint" / "model.json").is_file()
    assert (store / "mlruns" / run_id / "artifacts" / "extra" / "info.json").is_file()
    assert [r.info.run_id for r in find_runs("train_stage2")] == [run_id]
    assert find_runs("train_stage3") == []


@pytest.mark.parametrize("upload", [True, False])
def test_a_checkpoint_is_uploaded_unless_switched_off(store: Path, upload: bool) -> None:
    from clipid.models.checkpoint import save_checkpoint
    from clipid.models.factory import create_model

    weights = save_checkpoint(create_model("clipid-vit-tiny").model.state_dict(),
                              store / "models" / "stage2" / "model.safetensors",
                              {"architecture": "clipid-vit-tiny"})
    params = params_from_dict({"mlflow": {"log_checkpoints": upload}})
    with Tracker(stage="train_stage2", params=params, run_name="stage2") as tracker:
        tracker.log_checkpoint(weights, 3.5)
        run_id = tracker.run_id
    run = client(store).get_run(run_id)
    assert run.data.metrics["train_seconds"] == 3.5
    logged = sorted(a.path for a in client(store).list_artifacts(run_id))
    # The weights go up once, inside the MLflow Model (clipid.deploy), not as a loose file.
    assert logged == (["checkpoint", "model"] if upload else ["checkpoint"])
    assert [a.path for a in client(store).list_artifacts(run_id, "checkpoint")] == [
        "checkpoint/model.json"]


def test_the_git_commit_is_tagged(store: Path) -> None:
    commit = git_commit(store)
    with Tracker(stage="report", params=Params()) as tracker:
        run_id = tracker.run_id
    tags = client(store).get_run(run_id).data.tags
    assert tags["git.commit"] == tags["mlflow.source.git.commit"] == commit


def test_an_evaluation_reopens_the_training_run(store: Path) -> None:
    params = Params()
    with Tracker(stage="train_stage2", params=params) as tracker:
        run_id = tracker.run_id
    with Tracker(stage="evaluate@stage2", params=params, run_id=run_id) as tracker:
        assert tracker.run_id == run_id
        tracker.log_metrics({"eval/i2i/mAP": 0.5})
    run = client(store).get_run(run_id)
    assert run.data.metrics["eval/i2i/mAP"] == 0.5
    assert run.data.tags["clipid.stage"] == "train_stage2"
    assert run.data.tags["clipid.eval_stage"] == "evaluate@stage2"
    assert run.info.status == "FINISHED"
    # A run id from another store: a run of its own instead.
    with Tracker(stage="evaluate@stage2", params=params, run_id="0" * 32) as tracker:
        assert tracker.run_id not in (None, "0" * 32)


def test_a_failing_stage_marks_the_run_failed_and_still_raises(store: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), \
            Tracker(stage="train_stage3", params=Params()) as tracker:
        run_id = tracker.run_id
        raise RuntimeError("boom")
    assert client(store).get_run(run_id).info.status == "FAILED"


def test_an_unreachable_server_warns_once_and_the_run_is_spooled(
        store: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Tracker(stage="train_stage2", params=Params()) as tracker:
            tracker.log_metrics({"x": 1.0}, step=1)
            tracker.log_artifact(__file__)
            tracker.set_tags({"a": "b"})
            assert tracker.run_id is None
    assert time.perf_counter() - start < 10  # retried, but not for minutes
    assert len(caught) == 1 and "http://127.0.0.1:9" in str(caught[0].message)
    assert "spooled" in str(caught[0].message)
    assert not (store / "mlruns").exists()
    assert tracker.spooled is not None and tracker.spooled.parent == store / ".clipid" / "spool"


def test_a_missing_artifact_warns_and_the_run_goes_on(store: Path) -> None:
    with Tracker(stage="train_stage2", params=Params()) as tracker:
        run_id = tracker.run_id
        tracker.log_artifact(store / "missing.bin")  # the caller's mistake, not the store's
        tracker.log_metrics({"x": 1.0})
        assert tracker.run_id == run_id
    run = client(store).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["x"] == 1.0
    assert client(store).list_artifacts(run_id) == []


def test_tracking_uri_from_the_environment_wins(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = store / "elsewhere" / "other.db"
    other.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    assert tracking_uri() == f"sqlite:///{other}"
    with Tracker(stage="report", params=Params()) as tracker:
        run_id = tracker.run_id
    assert other.is_file() and not (store / "mlruns").exists()
    run = client(f"sqlite:///{other}").get_run(run_id)
    assert client(f"sqlite:///{other}").get_experiment(run.info.experiment_id).name == "mine"


def test_a_tracker_leaves_the_environment_alone(store: Path) -> None:
    with Tracker(stage="report", params=Params()):
        pass
    # MLflow's fluent API would export MLFLOW_TRACKING_URI and pin later stores to this one.
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_a_run_logs_the_params_its_dvc_stage_reads_under_its_commit(store: Path) -> None:
    (store / "dvc.yaml").write_text("stages:\n  train_stage2:\n    cmd: x\n"
                                    "    params: [train.lr, stage2, {params.yaml: [eval.flip]}]\n"
                                    "  evaluate:\n    foreach: [stage2]\n    do:\n"
                                    "      cmd: y\n      params: [eval]\n")
    git_commit(store)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "add", "dvc.yaml"], cwd=store, check=True)
    subprocess.run([*git, "commit", "-qm", "pipeline"], cwd=store, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=store, check=True, text=True,
                            capture_output=True).stdout.strip()
    params = Params()
    with Tracker(stage="train_stage2", params=params, run_name="stage2") as tracker:
        first = tracker.run_id
    with Tracker(stage="evaluate@stage2", params=params, run_name="stage2") as tracker:
        second = tracker.run_id
    flat = flatten_params(params)
    runs = {r.info.run_id: r for r in find_runs()}
    assert set(runs[first].data.params) == {"train.lr", "eval.flip"} | {
        k for k in flat if k.startswith("stage2.")}
    assert set(runs[second].data.params) == {k for k in flat if k.startswith("eval.")}
    # Both under the parent run of this commit's plain repro, named after it.
    parent = client(store).get_run(runs[first].data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == commit[:7]
    assert parent.data.tags["clipid.pipeline"] == f"repro:{commit}"
    assert runs[second].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert runs[first].info.run_name == f"{commit[:7]}/stage2"
