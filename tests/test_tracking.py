"""MLflow tracking: where runs go, what they hold, and that tracking never stops the pipeline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from clipid.config import flatten_params, params_from_dict
from clipid.tracking import Tracker, tracking_uri, ui_command


@pytest.fixture
def store(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return tmp_path


def client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def test_store_is_under_dvc_root(store):
    assert tracking_uri() == f"sqlite:///{store / 'mlflow.db'}"
    cmd = ui_command(port=5123)
    assert cmd[:2] == ["mlflow", "ui"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == tracking_uri()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and "5123" in cmd


def test_a_run_holds_params_metrics_tags_and_artifacts(store, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lark")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    params = params_from_dict({"train": {"lr": 1e-05}})
    artifact = store / "model.json"
    artifact.write_text("{}")
    with Tracker(stage="train_stage2", params=params, run_name="stage2") as tracker:
        for step in (1, 2, 3):
            tracker.log_metrics({"train/loss": 1.0 / step, "bad name!": 2.0,
                                 "nan": float("nan")}, step=step)
        tracker.log_artifact(artifact, "checkpoint")
        run_id = tracker.run_id
    run = client(store).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "1e-05"
    assert run.data.params["stage2.loss"] == "supcon"
    assert run.data.params == {k: str(v) for k, v in flatten_params(params).items()}
    history = client(store).get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert "bad name_" in run.data.metrics and "nan" not in run.data.metrics
    tags = run.data.tags
    assert tags["clipid.stage"] == "train_stage2" and tags["dvc.exp_name"] == "lucky-lark"
    assert tags["dvc.exp_baseline_rev"] == "a" * 40
    assert tags["data.source"] == "synthetic" and tags["model.name"] == "clipid-vit-tiny"
    artifacts = [a.path for a in client(store).list_artifacts(run_id, "checkpoint")]
    assert artifacts == ["checkpoint/model.json"]
    assert (store / "mlruns").is_dir()


def test_an_evaluation_reopens_the_training_run(store):
    params = params_from_dict({})
    with Tracker(stage="train_stage2", params=params) as tracker:
        run_id = tracker.run_id
    with Tracker(stage="evaluate@stage2", params=params, run_id=run_id) as tracker:
        tracker.log_metrics({"eval/i2i/mAP": 0.5})
    run = client(store).get_run(run_id)
    assert run.data.metrics["eval/i2i/mAP"] == 0.5
    assert run.data.tags["clipid.stage"] == "train_stage2"
    # A run id from another store: a run of its own instead.
    with Tracker(stage="evaluate@stage2", params=params, run_id="0" * 32) as tracker:
        assert tracker.run_id not in (None, "0" * 32)


def test_a_failing_stage_marks_the_run_failed_and_still_raises(store):
    with pytest.raises(RuntimeError, match="boom"), \
            Tracker(stage="train_stage3", params=params_from_dict({})) as tracker:
        run_id = tracker.run_id
        raise RuntimeError("boom")
    assert client(store).get_run(run_id).info.status == "FAILED"


def test_an_unreachable_server_warns_and_the_stage_goes_on(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="127.0.0.1:9"), \
            Tracker(stage="train_stage2", params=params_from_dict({})) as tracker:
        tracker.log_metrics({"x": 1.0}, step=1)
        tracker.log_artifact(__file__)
        assert tracker.run_id is None
    assert time.perf_counter() - start < 30
    assert not (store / "mlflow.db").exists()


def test_tracking_uri_from_the_environment_wins(store, monkeypatch, tmp_path):
    other = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    assert tracking_uri() == f"sqlite:///{other}"
    with Tracker(stage="report", params=params_from_dict({})) as tracker:
        assert tracker.run_id
    assert other.is_file()
