"""Team mode (README: Team setup) against real servers on loopback: the micro pipeline, restored
from the run-cache, is mirrored into `clipid server` on PostgreSQL (runs, metrics, versions,
alias, lineage, the champion loaded from the server), its experiments track into it live, and its
outputs go through a local-folder DVC remote and an S3 remote on SeaweedFS into fresh clones.
The team install, the server's command line and a server of its own: tests/test_team_setup.py."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from _servers import (
    S3_KEY,
    S3_SECRET,
    create_database,
    mlflow_client,
    seaweedfs,
    server_env,
    stop,
    tracking_server,
    why_no_s3,
)
from test_pipeline import STAGES, sh, wait_for_queue, write_micro_pipeline

from _browser import free_port
from conftest import MicroBuild, TeamServer

REPO = Path(__file__).resolve().parents[1]
TRACKED_STAGES = {"evaluate_stage1", "train_stage2", "train_stage3", "train_stage4",
                  "clipreid_prompts", "clipreid_image", "index", "report"}


def git_clone(origin: Path, dest: Path) -> Path:
    sh(origin.parent, "git", "clone", "-q", str(origin), str(dest))
    sh(dest, "git", "config", "user.email", "test@example.com")
    sh(dest, "git", "config", "user.name", "clipid test")
    return dest


@pytest.fixture(scope="module")
def team_repo(team_server: TeamServer, micro_built: MicroBuild,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(origin, first clone)``: a bare repository with the micro pipeline and a shared DVC
    remote (a folder), whose first clone ran ``dvc repro`` against the team server and pushed
    dvc.lock and metrics/. Its DVC cache is the session's micro build's, so DVC restores every
    stage from the run-cache and `track` mirrors them into the server (what a teammate's clone
    sharing a cache or a remote does); the stages that run live against the server: the parallel
    experiments and the stopped server's experiment below."""
    base = tmp_path_factory.mktemp("team")
    seed = write_micro_pipeline(base / "seed")
    sh(seed, "git", "init", "-q", "-b", "main")  # the production branch (mlflow.production_branch)
    sh(seed, "dvc", "init", "-q")
    sh(seed, "dvc", "config", "core.analytics", "false")
    sh(seed, "dvc", "remote", "add", "-d", "shared", str(base / "dvc-remote"))
    sh(seed, "git", "add", "-A")
    sh(seed, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "micro")
    origin = base / "origin.git"
    sh(base, "git", "clone", "-q", "--bare", str(seed), str(origin))

    first = git_clone(origin, base / "first")
    sh(first, "dvc", "config", "--local", "cache.dir", str(micro_built.cache))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", team_server.url)
        out = sh(first, "dvc", "repro", timeout=3600)
    assert not set(re.findall(r"Running stage '([^']+)'", out)) & TRACKED_STAGES - {"report"}, out
    sh(first, "git", "add", "-A")
    sh(first, "git", "commit", "-qm", "repro")
    sh(first, "git", "push", "-q", "origin", "HEAD")
    return origin, first


@pytest.mark.slow
@pytest.mark.team
def test_the_pipeline_tracks_into_the_team_server(team_server: TeamServer,
                                                  team_repo: tuple[Path, Path]) -> None:
    _, first = team_repo
    client = mlflow_client(team_server.url)
    experiment = client.get_experiment_by_name("clipid")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    by_stage = {r.data.tags.get("clipid.stage"): r for r in runs}
    assert set(by_stage) >= TRACKED_STAGES, sorted(by_stage)
    assert not list((first / ".clipid" / "spool").glob("*.json")), "a run was spooled"
    stage2 = by_stage["train_stage2"]
    assert stage2.data.tags["clipid.restored"] == "dvc"  # made by `track`, DVC restored it
    assert "eval/i2i/mAP" in stage2.data.metrics
    assert stage2.data.params["train.lr"] == "0.001"
    # Artifacts go through the server (proxied) into its destination folder.
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)
    assert len(list(team_server.artifacts.rglob("MLmodel"))) >= len(STAGES)

    from clipid.models.checkpoint import file_sha256

    champions = json.loads((first / "metrics" / "register.json").read_text())
    for name in ("clipid-image", "clipid-text"):
        assert len(client.search_model_versions(f"name = '{name}'")) >= len(STAGES)
        champion = client.get_model_version_by_alias(name, "champion")
        stage = champions[name]["stage"]
        assert champion.tags["clipid.stage"] == stage
        weights = first / "models" / stage / "model.safetensors"
        assert champion.tags["clipid.weights_sha256"] == file_sha256(weights)

    # Lineage through the server: stage 3's weights lead to its training run.
    env = {"MLFLOW_TRACKING_URI": team_server.url}
    lineage = _run(first, env, "clipid", "lineage", "stage3")
    assert f"store {team_server.url}" in lineage
    assert by_stage["train_stage3"].info.run_id in lineage
    assert "parent models/stage2/model.safetensors" in lineage


@pytest.mark.slow
@pytest.mark.team
def test_the_champion_loads_from_the_team_server(team_server: TeamServer,
                                                 team_repo: tuple[Path, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    import pandas as pd

    _, first = team_repo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server.url)
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model("models:/clipid-image@champion")
    image = next((first / "data" / "prepared" / "images").rglob("*.png"))
    vectors = np.asarray(model.predict(pd.DataFrame(
        {"image": [base64.b64encode(image.read_bytes()).decode()]})))
    assert vectors.shape[0] == 1 and vectors.shape[1] > 0
    assert np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
@pytest.mark.team
def test_two_experiments_in_parallel_lose_no_run(team_server: TeamServer,
                                                 team_repo: tuple[Path, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, first = team_repo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server.url)  # the queue's workers inherit it
    for lr in ("1e-5", "2e-5"):  # DVC writes 1e-05, which plain PyYAML reads as a string
        sh(first, "dvc", "exp", "run", "--queue", "-S", f"train.lr={lr}", "evaluate@stage2")
    sh(first, "dvc", "queue", "start", "-j", "2")
    try:
        status = wait_for_queue(first)
    finally:
        sh(first, "dvc", "queue", "stop")  # DVC's own workers, by DVC
    assert status.count("Success") == 2 and "Failed" not in status, status
    client = mlflow_client(team_server.url)
    experiment = client.get_experiment_by_name("clipid")
    runs = client.search_runs([experiment.experiment_id],
                              "tags.`clipid.stage` = 'train_stage2'")
    live = [r for r in runs if r.data.params["train.lr"] in ("1e-05", "2e-05")]
    queued = {r.data.params["train.lr"]: r.data.tags.get("dvc.exp_name") for r in live}
    assert len(queued) == 2 and all(queued.values()) and len(set(queued.values())) == 2, queued
    for run in live:  # logged while training and evaluating, the model through the server
        assert "clipid.restored" not in run.data.tags
        assert {"eval/i2i/mAP", "train/loss"} <= set(run.data.metrics)
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert "model/MLmodel" in {a.path for a in client.list_artifacts(run.info.run_id,
                                                                           "model")}
    assert not list((first / ".clipid" / "spool").glob("*.json")), "a run was spooled"
    log = team_server.log.read_text().splitlines()
    errors = [line for line in log if re.search(r'HTTP/[\d.]+" 5\d\d', line)]
    assert not errors, "\n".join(errors)


def _wait_for_run(url: str, stage: str, exp: subprocess.Popen, log: Path) -> None:
    """Until the server holds a run of ``stage`` (the experiment ``exp`` must not end first)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(url)
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        assert exp.poll() is None, f"the experiment ended first:\n{log.read_text()}"
        with contextlib.suppress(MlflowException):
            experiment = client.get_experiment_by_name("clipid")
            if experiment and client.search_runs([experiment.experiment_id],
                                                 f"tags.`clipid.stage` = '{stage}'"):
                return
        time.sleep(0.2)  # polling the server for a run that starts
    pytest.fail(f"no run of {stage} within 1200 s:\n{log.read_text()}")


@pytest.mark.slow
@pytest.mark.team
def test_a_server_stopped_mid_stage_loses_nothing_of_a_temporary_experiment(
        team_server: TeamServer, team_repo: tuple[Path, Path], micro_built: MicroBuild,
        tmp_path: Path) -> None:
    """`dvc exp run --temp` with the server stopped while train_stage4 runs: its runs spool into
    the workspace (DVC then deletes the experiment's own), `clipid tracking sync` after the
    restart replays them with the model registered and the experiment's candidate alias set."""
    from clipid import reconcile
    from clipid import tracking_spool as spool
    from clipid.models.checkpoint import file_sha256

    origin, first = team_repo
    database = create_database(team_server.database, "restart")
    port, workdir = free_port(), tmp_path / "server"
    clone = git_clone(origin, tmp_path / "clone")  # earlier stages come from first's cache
    sh(clone, "dvc", "config", "--local", "cache.dir", str(micro_built.cache))
    log = tmp_path / "exp.log"
    with tracking_server(database, str(workdir / "artifacts"), workdir, port=port) as url, \
            log.open("wb") as out:
        exp = subprocess.Popen(["dvc", "exp", "run", "--temp", "-n", "long-stage4", "-S",
                                "stage4.epochs=6"], cwd=clone, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True,
                               env={**server_env(), "MLFLOW_TRACKING_URI": url})
        try:
            _wait_for_run(url, "train_stage4", exp, log)
        except BaseException:
            stop(exp)
            raise
    try:  # the server is stopped: the experiment goes on into the spool
        assert exp.wait(timeout=1800) == 0, log.read_text()
    finally:
        stop(exp)
    # Runs by stage (an evaluation's run is its training stage's, tagged with its own stage).
    records = {e.record.tags.get("clipid.eval_stage") or e.record.tags["clipid.stage"]: e.record
               for e in spool.pending(clone)}
    assert sorted(records) == ["evaluate@stage4", "index", "report", "train_stage4"]
    weights = records["train_stage4"].tags["clipid.checkpoint.sha256"]
    assert weights != file_sha256(first / "models" / "stage4" / "model.safetensors")
    [(_, snap)] = reconcile.pending(clone)
    assert snap.parent_tags["dvc.exp_name"] == "long-stage4" and snap.branch == "main"
    trained = Path(records["train_stage4"].artifacts[0]["path"])
    assert ".dvc/tmp/exps/" in trained.as_posix() and not trained.exists()  # DVC deleted it

    with tracking_server(database, str(workdir / "artifacts"), workdir, port=port) as again:
        assert again == url
        _run(clone, {"MLFLOW_TRACKING_URI": url}, "clipid", "tracking", "sync")
        assert spool.pending(clone) == [] and reconcile.pending(clone) == []
        _assert_replayed(mlflow_client(url), weights, snap.champions, records)


def _assert_replayed(client, weights: str, champions: dict[str, str], records: dict) -> None:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name("clipid")
    [run] = client.search_runs([experiment.experiment_id],
                               "tags.`clipid.stage` = 'train_stage4' and "
                               "tags.`dvc.exp_name` = 'long-stage4'")  # the partial one: deleted
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert run.data.tags["clipid.weights_sha256"] == weights
    assert run.data.tags["clipid.spool.id"] == records["train_stage4"].id
    assert "eval/i2i/mAP" in run.data.metrics  # the evaluation went into it
    versions = client.search_model_versions("name = 'clipid-image'")
    assert [v.run_id for v in versions if v.tags["clipid.weights_sha256"] == weights] == [
        run.info.run_id]
    for model, stage in champions.items():
        candidate = client.get_model_version_by_alias(model, "candidate-long-stage4")
        assert candidate.tags["clipid.stage"] == stage
        with pytest.raises(MlflowException):  # an experiment never moves the production alias
            client.get_model_version_by_alias(model, "champion")


def _run(cwd: Path, env: dict[str, str], *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env={**server_env(), **env}, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _only_the_fingerprint_reruns(clone: Path) -> None:
    """Every output came from the remote: a repro runs the always-changed fingerprint and
    MLflow view (track) only."""
    out = sh(clone, "dvc", "repro")
    assert re.findall(r"Running stage '([^']+)'", out) == ["fingerprint", "track"], out
    assert sh(clone, "git", "status", "--porcelain") == ""


@pytest.mark.slow
@pytest.mark.team
def test_a_local_folder_remote_gives_a_fresh_clone_every_output(team_repo: tuple[Path, Path]
                                                                ) -> None:
    origin, first = team_repo
    sh(first, "dvc", "push")
    fresh = git_clone(origin, origin.parent / "fresh")  # a DVC cache of its own, empty
    sh(fresh, "dvc", "pull")
    assert (fresh / "models" / "stage4" / "model.safetensors").read_bytes() == (
        first / "models" / "stage4" / "model.safetensors").read_bytes()
    _only_the_fingerprint_reruns(fresh)


def _add_s3_remote(clone: Path, endpoint: str) -> None:
    """The S3 remote; its endpoint and keys in .dvc/config.local, never in git."""
    sh(clone, "dvc", "remote", "add", "--local", "s3", "s3://clipid/dvc")
    for key, value in (("endpointurl", endpoint), ("access_key_id", S3_KEY),
                       ("secret_access_key", S3_SECRET)):
        sh(clone, "dvc", "remote", "modify", "--local", "s3", key, value)


@pytest.mark.slow
@pytest.mark.team
def test_an_s3_remote_on_seaweedfs_gives_a_fresh_clone_every_output(
        team_repo: tuple[Path, Path], tmp_path: Path) -> None:
    if why := why_no_s3():
        pytest.skip(f"the S3 remote test needs SeaweedFS and dvc-s3: {why}")
    origin, first = team_repo
    with seaweedfs(tmp_path, "clipid") as endpoint:
        _add_s3_remote(first, endpoint)
        sh(first, "dvc", "push", "-r", "s3")
        assert "in sync" in sh(first, "dvc", "status", "--cloud", "-r", "s3")
        fresh = git_clone(origin, origin.parent / "fresh-s3")
        _add_s3_remote(fresh, endpoint)
        sh(fresh, "dvc", "pull", "-r", "s3")
    assert (fresh / "models" / "stage4" / "model.safetensors").read_bytes() == (
        first / "models" / "stage4" / "model.safetensors").read_bytes()
    _only_the_fingerprint_reruns(fresh)
