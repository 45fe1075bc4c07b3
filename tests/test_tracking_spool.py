"""No run is lost: parallel stages on one new SQLite store, a store that fails mid-run or is
unreachable (the run is spooled and replayed), and a stage killed mid-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from clipid import tracking
from clipid import tracking_spool as spool
from clipid.config import Params, flatten_params, load_params
from clipid.models.checkpoint import file_sha256
from clipid.tracking import Tracker, sync_spool
from test_pipeline import MICRO, REPO, _merge

from conftest import VENV_BIN, client

WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import mlflow  # noqa: F401  (imported before the barrier: the processes then start at once)
    from clipid.config import Params
    from clipid.tracking import Tracker

    name, barrier, count, artifact = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    (barrier / name).touch()
    deadline = time.time() + 300
    while len(list(barrier.iterdir())) < count and time.time() < deadline:
        time.sleep(0.01)
    with Tracker(stage="train_stage2", params=Params(), run_name=name) as tracker:
        for step in range(1, 101):
            tracker.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step=step)
        tracker.log_artifact(artifact, "checkpoint")
        tracker.set_tags({"worker": name})
    print("spooled" if tracker.spooled else "tracked")
""")


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", **extra}
    for name in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_STAGE"):
        if name not in extra:
            out.pop(name, None)
    return out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_runs(uri: str) -> list:
    c = tracking.mlflow_client(uri)  # under the store's lock: a stage may be creating it
    return c.search_runs([e.experiment_id for e in c.search_experiments()])


def test_parallel_stages_on_a_new_sqlite_store_all_land_complete(tmp_path: Path) -> None:
    """Four processes open one store that does not exist yet, at the same moment (the race
    that lost a queued experiment's run: "table runs already exists"), then log."""
    root, barrier = tmp_path / "repo", tmp_path / "barrier"
    root.mkdir()
    barrier.mkdir()
    artifact = root / "model.json"
    artifact.write_text("{}")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    names = [f"w{i}" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, str(script), name, str(barrier), str(len(names)),
                               str(artifact)], env=env(DVC_ROOT=str(root)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in names]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == "tracked", err  # straight into the store, not via the spool
    runs = all_runs(f"sqlite:///{root / 'mlflow.db'}")
    assert sorted(r.info.run_name for r in runs) == names
    expected_params = {k: str(v) for k, v in flatten_params(Params()).items()}
    c = client(f"sqlite:///{root / 'mlflow.db'}")
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params == expected_params
        assert run.data.tags["worker"] == run.info.run_name
        assert run.data.tags["clipid.stage"] == "train_stage2"
        history = c.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, 101))
        assert [a.path for a in c.list_artifacts(run.info.run_id, "checkpoint")] == [
            "checkpoint/model.json"]
    assert spool.pending(root) == []


def test_a_store_failing_mid_run_spools_all_of_it_and_the_next_stage_replays_it(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "_RETRIES", 1)
    artifact = store / "metrics.json"
    artifact.write_text('{"mAP": 0.5}')
    with Tracker(stage="train_stage2", params=Params(), run_name="stage2",
                 tags={"owner": "me"}) as tracker:
        partial = tracker.run_id
        tracker.log_metrics({"train/loss": 2.0}, step=1)
        real = tracker._client.log_batch

        def locked(*args, **kwargs):
            raise RuntimeError("database is locked")
        monkeypatch.setattr(tracker._client, "log_batch", locked)
        with pytest.warns(UserWarning, match="spooled"):
            tracker.log_metrics({"train/loss": 1.0}, step=2)
        assert tracker.run_id is None
        tracker.log_metrics({"train/loss": 0.5}, step=3)  # goes on into the spool
        tracker.log_artifact(artifact, "eval")
        tracker.log_dict({"a": 1}, "extra/info.json")
        monkeypatch.setattr(tracker._client, "log_batch", real)
    assert "stage2" in " ".join(tracking.UNTRACKED)
    tracking.UNTRACKED.clear()
    [entry] = spool.pending(store)
    assert entry.record.status == "FINISHED" and entry.record.partial_run_id == partial
    artifact.write_text('{"mAP": 0.9}')  # the next run overwrote it: the spool kept a copy
    spooled_times = [m[2] for m in entry.record.metrics]

    with Tracker(stage="report", params=Params()):  # reaches the store: replays first
        pass
    assert spool.pending(store) == []
    c = client(store)
    [run] = [r for r in all_runs(f"sqlite:///{store / 'mlflow.db'}")
             if r.info.run_name == "stage2"]  # the partial run is gone (soft-deleted)
    assert run.info.run_id != partial and run.info.status == "FINISHED"
    assert c.get_run(partial).info.lifecycle_stage == "deleted"
    assert run.info.start_time == entry.record.start_time
    assert run.info.end_time == entry.record.end_time
    history = c.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0), (3, 0.5)]
    assert [m.timestamp for m in history] == spooled_times
    assert run.data.tags["owner"] == "me" and run.data.tags["clipid.stage"] == "train_stage2"
    assert run.data.params == {k: str(v) for k, v in flatten_params(Params()).items()}
    local = Path(c.download_artifacts(run.info.run_id, "eval/metrics.json", str(store / "dl")))
    assert json.loads(local.read_text()) == {"mAP": 0.5}
    assert [a.path for a in c.list_artifacts(run.info.run_id, "extra")] == ["extra/info.json"]


def test_a_spooled_run_whose_process_died_replays_failed(store: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    record = spool.RunRecord(uri=tracking.tracking_uri(), experiment="clipid",
                             run_name="stage3", pid=dead.pid, tags={"clipid.stage": "x"})
    record.metrics.append(["train/loss", 1.0, record.start_time, 1])
    spool.write(record, store)
    live = spool.RunRecord(uri=tracking.tracking_uri(), experiment="clipid", run_name="live")
    spool.write(live, store)  # this process: still running, so it stays
    [(entry, run_id)] = sync_spool(store)
    assert entry.record.id == record.id
    run = client(store).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.metrics["train/loss"] == 1.0
    assert [e.record.id for e in spool.pending(store)] == [live.id]


@pytest.fixture
def micro_stage_dir(tmp_path: Path) -> Path:
    """A folder the train and evaluate stages run in: micro params.yaml and prepared data."""
    from clipid.stages.clean_captions import clean_captions
    from clipid.stages.prepare import prepare
    from clipid.workspace import Workspace

    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), MICRO)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    loaded = load_params(tmp_path / "params.yaml")
    prepare(loaded, Workspace(tmp_path))
    clean_captions(loaded, Workspace(tmp_path))
    return tmp_path


def clipid(cwd: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "clipid", *args], cwd=cwd,
                          env=env(**extra), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_stages_against_an_unreachable_server_spool_and_sync_completes_them(
        micro_stage_dir: Path) -> None:
    down = f"http://127.0.0.1:{closed_port()}"
    train = clipid(micro_stage_dir, "train", "stage2", MLFLOW_TRACKING_URI=down)
    last = train.stderr.strip().splitlines()[-1]
    assert "not tracked: spooled to" in last and "stage2" in last
    clipid(micro_stage_dir, "evaluate", "stage2", MLFLOW_TRACKING_URI=down)
    status = clipid(micro_stage_dir, "tracking", "status").stdout
    assert status.count(down) == 2 and "FINISHED" in status

    synced = clipid(micro_stage_dir, "tracking", "sync").stdout  # into ./mlflow.db
    assert synced.count("replayed") == 2 and "0 spooled run(s) left" in synced
    [run] = all_runs(f"sqlite:///{micro_stage_dir / 'mlflow.db'}")
    weights = micro_stage_dir / "models" / "stage2" / "model.safetensors"
    assert run.info.status == "FINISHED" and run.info.run_name == "stage2"
    assert run.data.tags["clipid.checkpoint.sha256"] == file_sha256(weights)
    assert run.data.tags["clipid.eval_stage"] == "evaluate@stage2"
    params = load_params(micro_stage_dir / "params.yaml")
    assert run.data.params == {k: str(v)[:6000] for k, v in flatten_params(params).items()}
    assert {"train/loss", "train_seconds", "eval/i2i/mAP", "eval_seconds"} <= set(
        run.data.metrics)
    c = client(f"sqlite:///{micro_stage_dir / 'mlflow.db'}")
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(steps) and len(steps) >= 2  # log_every 1: every step
    assert run.info.start_time < run.info.end_time < time.time() * 1000
    # As a live run logs it: the weights inside the registered MLflow Model, the sidecar beside.
    logged = {a.path for a in c.list_artifacts(run.info.run_id, "checkpoint")}
    assert logged == {"checkpoint/model.json"}
    assert "model/MLmodel" in {a.path for a in c.list_artifacts(run.info.run_id, "model")}
    [version] = c.search_model_versions("name = 'clipid-image'")
    assert version.run_id == run.info.run_id
    assert version.tags["clipid.weights_sha256"] == file_sha256(weights)
    assert {a.path for a in c.list_artifacts(run.info.run_id, "eval")} == {
        "eval/stage2.json", "eval/cmc", "eval/roc", "eval/examples"}
    lineage = clipid(micro_stage_dir, "lineage", "stage2").stdout
    assert run.info.run_id in lineage


@pytest.mark.slow
def test_a_stage_killed_mid_run_does_not_stay_running(micro_stage_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    params = yaml.safe_load((micro_stage_dir / "params.yaml").read_text())
    params["train"]["epochs"] = 500
    (micro_stage_dir / "long.yaml").write_text(yaml.safe_dump(params))
    uri = f"sqlite:///{micro_stage_dir / 'mlflow.db'}"
    proc = subprocess.Popen([sys.executable, "-m", "clipid", "train", "stage2", "--params",
                             "long.yaml"], cwd=micro_stage_dir, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(1)
            if (micro_stage_dir / "mlflow.db").exists():
                runs = all_runs(uri)
                if runs and "train/loss" in runs[0].data.metrics:
                    break
        else:
            pytest.fail("the training run never logged a loss")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    [killed] = all_runs(uri)
    assert killed.info.status == "RUNNING"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(micro_stage_dir))
    with Tracker(stage="report", params=Params()):  # the next stage on this host
        pass
    run = client(uri).get_run(killed.info.run_id)
    assert run.info.status == "FAILED" and run.data.tags["clipid.ended"] == "process died"


def test_a_spooled_run_keeps_its_model_and_big_files_once_its_workspace_is_gone(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A temporary experiment's workspace (``.dvc/tmp/exps/...``) is deleted when it ends: the
    spool keeps the checkpoint and a figure over 1 MiB (hard links), replay registers the
    model, and the evaluation's replay goes into the training run without taking its tags."""
    from clipid.deploy import IMAGE_MODEL, TEXT_MODEL
    from test_deploy import checkpoint

    monkeypatch.setattr(tracking, "_RETRIES", 0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    temp = store / "tmp-exp"
    weights = checkpoint(temp / "models", "stage4", seed=3)
    figure = temp / "examples.png"
    figure.write_bytes(os.urandom(3 << 19))  # 1.5 MiB
    digests = {"weights": file_sha256(weights), "figure": file_sha256(figure)}
    with pytest.warns(UserWarning, match="spooled"), Tracker(
            stage="train_stage4", params=Params(), run_name="stage4") as train:
        train.log_metrics({"train/loss": 1.0}, step=1)
        train.log_checkpoint(weights, 2.0)
        train.log_artifact(figure, "report")
    with pytest.warns(UserWarning, match="spooled"), Tracker(
            stage="train_stage4", params=Params(), run_name="stage4", checkpoint=weights,
            tags={"clipid.eval_stage": "evaluate@stage4"}) as evaluation:
        evaluation.log_metrics({"eval/i2i/mAP": 0.25})
    tracking.UNTRACKED.clear()
    kept = [p for p in spool.spool_dir(store).rglob("*") if p.is_file()
            and p.stat().st_size > 1 << 20]
    assert sorted(p.name for p in kept) == ["examples.png", "model.safetensors"]
    assert all(p.stat().st_nlink == 2 for p in kept)  # linked: no second copy on disk
    training, evaluated = spool.pending(store)
    assert [a.get("model") for a in training.record.artifacts] == ["stage4", None, None]
    shutil.rmtree(temp)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    evaluated_json = evaluated.path.read_text()
    [(_, run_id), (_, eval_into)] = sync_spool(store)
    assert eval_into == run_id and spool.pending(store) == []
    c = client(store)
    run = c.get_run(run_id)
    assert "model/MLmodel" in {a.path for a in c.list_artifacts(run_id, "model")}
    for name in (IMAGE_MODEL, TEXT_MODEL):
        [version] = c.search_model_versions(f"name = '{name}'")
        assert version.run_id == run_id
        assert version.tags["clipid.weights_sha256"] == digests["weights"]
    tags = run.data.tags
    assert tags["clipid.spool.id"] == training.record.id  # the evaluation took none of it
    assert tags["clipid.spool.eval_id"] == evaluated.record.id
    assert tags["clipid.eval_stage"] == "evaluate@stage4"
    assert not {k for k in tags if "missing" in k}
    assert {"train/loss", "train_seconds", "eval/i2i/mAP"} <= set(run.data.metrics)
    local = c.download_artifacts(run_id, "report/examples.png", str(store / "dl"))
    assert file_sha256(local) == digests["figure"]

    evaluated.path.write_text(evaluated_json)  # as if the replay died before it left the spool
    [(_, again)] = sync_spool(store)
    assert again == run_id and c.get_run(run_id).data.tags == tags
    assert len(c.get_metric_history(run_id, "eval/i2i/mAP")) == 1


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=root,
                   check=True, capture_output=True)


def test_the_champion_policy_keeps_champion_to_the_production_branch_on_a_shared_store(
        store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from clipid.config import params_from_dict
    from clipid.deploy import IMAGE_MODEL
    from clipid.stages.register import register_stage
    from clipid.workspace import Workspace
    from test_deploy import checkpoint, train_run, write_metrics

    workspace = Workspace(store)
    write_metrics(workspace.metrics, {"stage2": (0.3, 0.1)})
    _git(store, "init", "-q", "-b", "main")
    _git(store, "commit", "-q", "--allow-empty", "-m", "x")
    c = client(store)

    def register(promote: str = "auto") -> bytes:
        register_stage(params_from_dict({"mlflow": {"promote": promote}}), ["stage2"],
                       workspace)
        return workspace.register_metrics.read_bytes()

    def aliases() -> dict[str, str]:
        return dict(c.get_registered_model(IMAGE_MODEL).aliases)

    def retrain(seed: int) -> str:
        train_run("stage2", checkpoint(workspace.models, "stage2", seed=seed))
        return max((v.version for v in c.search_model_versions(f"name = '{IMAGE_MODEL}'")),
                   key=int)

    first = retrain(1)  # creates the experiment, its artifacts in the store's folder
    # A store others share (MLFLOW_TRACKING_URI): production is main's dvc repro.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    on_main = register()
    assert aliases() == {"champion": first}
    second = retrain(2)
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-lr")
    assert register() == on_main  # the alias stays out of the DVC output
    assert aliases() == {"champion": first, "candidate-bushy-lr": second}
    assert "clipid-image@candidate-bushy-lr version" in capsys.readouterr().out
    monkeypatch.delenv("DVC_EXP_NAME")
    _git(store, "checkout", "-q", "-b", "feature/lr+warmup")
    register()
    assert aliases()["candidate-feature-lr-warmup"] == second and aliases()["champion"] == first
    register("always")
    assert aliases()["champion"] == second
    _git(store, "checkout", "-q", "main")
    third = retrain(3)
    register("never")
    assert aliases()["candidate-main"] == third and aliases()["champion"] == second
    # The repository's own store (one person): every pipeline moves champion, as before.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-lr")
    register()
    assert aliases()["champion"] == third


def test_a_run_that_fails_after_its_model_was_registered_replays_with_the_model(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The half-written run is deleted on replay: the versions go with the replayed run."""
    from test_deploy import checkpoint

    monkeypatch.setattr(tracking, "_RETRIES", 0)
    weights = checkpoint(store / "models", "stage2", seed=4)
    with Tracker(stage="train_stage2", params=Params(), run_name="stage2") as tracker:
        tracker.log_checkpoint(weights, 1.0)
        partial = tracker.run_id

        def down(*args, **kwargs):
            raise ConnectionError("server gone")
        monkeypatch.setattr(tracker._client, "log_batch", down)
        with pytest.warns(UserWarning, match="spooled"):
            tracker.log_metrics({"train/loss": 0.5}, step=1)
    tracking.UNTRACKED.clear()
    c = client(store)
    assert {v.run_id for v in c.search_model_versions("name = 'clipid-image'")} == {partial}
    [(_, run_id)] = sync_spool(store)
    assert c.get_run(partial).info.lifecycle_stage == "deleted"
    [version] = c.search_model_versions("name = 'clipid-image'")
    assert version.run_id == run_id
    assert version.tags["clipid.weights_sha256"] == file_sha256(weights)
    assert "model/MLmodel" in {a.path for a in c.list_artifacts(run_id, "model")}


def test_a_spooled_pipeline_view_registers_its_kept_checkpoint_and_sets_the_policys_alias(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`track` spooled in a temporary experiment: its checkpoint is gone by the replay, the
    spool's copy registers it, and on a shared store the experiment gets its candidate alias."""
    import dataclasses

    from clipid.lineage import checkpoint_tags
    from clipid.reconcile import RunView, Snapshot, pending, write_spooled
    from test_deploy import checkpoint

    weights = checkpoint(store / "tmp-exp" / "models", "stage4", seed=5)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    view = RunView("train_stage4", "stage4", tags=checkpoint_tags(weights), model="checkpoint",
                   checkpoint=str(weights))
    snap = Snapshot(uri, "clipid", (store / "mlruns").as_uri(), "exp:wide-lr:abc", "wide-lr",
                    {"dvc.exp_name": "wide-lr"}, dataclasses.asdict(Params()), [view],
                    {"clipid-image": "stage4", "clipid-text": "stage4"}, branch="main")
    write_spooled(snap, store)
    shutil.rmtree(store / "tmp-exp")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # a shared store: the policy applies

    tracking.replay_spool(client(store), store, None)
    assert pending(store) == []
    c = client(store)
    for model in ("clipid-image", "clipid-text"):
        candidate = c.get_model_version_by_alias(model, "candidate-wide-lr")
        assert candidate.tags["clipid.weights_sha256"] == view.tags["clipid.checkpoint.sha256"]
        assert dict(c.get_registered_model(model).aliases) == {"candidate-wide-lr":
                                                               candidate.version}


def test_the_spool_keeps_what_it_can_names_what_it_lost_and_replays_once(
        store: Path, tmp_path_factory: pytest.TempPathFactory,
        caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest) -> None:
    """A big file on another filesystem is copied (no hard link across filesystems); a file
    rewritten before the spool kept it is named missing at replay; one the spool cannot keep
    stays by path (a warning); a record replayed twice (leaving the spool failed) leaves one
    run."""
    other_fs = Path("/dev/shm")
    if not other_fs.is_dir() or other_fs.stat().st_dev == store.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than the test's folder")
    source = tmp_path_factory.mktemp("outputs")
    shm = Path(tempfile.mkdtemp(dir=other_fs))
    request.addfinalizer(lambda: shutil.rmtree(shm, ignore_errors=True))  # RAM, even on failure
    big = shm / "figure.png"
    big.write_bytes(os.urandom(3 << 19))  # 1.5 MiB: over COPY_UP_TO, so linked where it can be
    rewritten, by_path = source / "cmc.json", source / "roc.json"
    rewritten.write_text('{"rank": 1}')
    by_path.write_text('{"tpr": 0.5}')
    record = spool.RunRecord(uri=tracking.tracking_uri(), experiment="clipid", run_name="stage2",
                             status="FINISHED", tags={"clipid.stage": "train_stage2"})
    for path in (big, rewritten, by_path):
        record.add_artifact(path, "eval", None)
    rewritten.write_text('{"rank": 2}')  # the stage rewrote it before the spool kept it
    files = spool.spool_dir(store) / f"{record.id}.files"
    files.mkdir(parents=True)
    (files / "2").write_text("in the way")  # roc.json's folder cannot be made

    with caplog.at_level("WARNING", logger="clipid.tracking_spool"):
        path = spool.write(record, store)
    assert f"could not keep {by_path}" in caplog.text
    copies = [a["copy"] for a in json.loads(path.read_text())["artifacts"]]
    assert copies[1:] == [None, None]  # both stay by path
    kept = spool.spool_dir(store) / copies[0]
    assert kept.stat().st_nlink == 1 and file_sha256(kept) == file_sha256(big)
    shutil.rmtree(shm)

    entry_json = path.read_text()
    [(_, first)] = sync_spool(store)
    c = client(store)
    assert c.get_run(first).data.tags["clipid.spool.missing_artifacts"] == "cmc.json"
    assert {a.path for a in c.list_artifacts(first, "eval")} == {"eval/figure.png",
                                                                 "eval/roc.json"}
    path.write_text(entry_json)  # as if the replay died before the record left the spool
    [(_, second)] = sync_spool(store)
    runs = c.search_runs([c.get_run(second).info.experiment_id],
                         f"tags.`clipid.spool.id` = '{record.id}'")
    assert [r.info.run_id for r in runs] == [second] and second != first
