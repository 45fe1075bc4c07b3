"""``clipid server``: a team's MLflow tracking server, started from this project's environment.

One ``mlflow server`` on a database (PostgreSQL for a team) with proxied artifacts: clients send
artifacts over HTTP to the server, which writes them to the artifact destination (a folder or
``s3://...``), so only the server needs the bucket's credentials. Sized for a team, not a web
farm: one uvicorn worker by default, and MLflow's GenAI job runner off (MLflow 3.17 otherwise
starts 4 workers and 10 job processes next to the server: 15 processes, about 2.5 GiB of RSS;
this configuration runs 2 processes, 0.5 GiB; BENCHMARKS.md, ``bench/server.py``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from clipid.errors import ClipidError

__all__ = ["ServerConfig", "server_command", "server_env"]

# Database schemes MLflow's SQL store takes; the part after "+" names a SQLAlchemy driver.
_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
# The Python module SQLAlchemy 2.1 imports for a scheme without "+driver".
_DEFAULT_DRIVERS = {"postgresql": "psycopg", "mysql": "MySQLdb", "mssql": "pyodbc"}
_TEAM_HINT = "install the team extra: `make env EXTRAS=team`"
# The job runner serves MLflow's GenAI features (judges, prompt optimisation), which clipid
# does not use; off, the server is 2 processes instead of 12 with the default 4 workers.
_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


@dataclass(frozen=True)
class ServerConfig:
    backend_store_uri: str      # postgresql://user:password@host:5432/mlflow
    artifacts_destination: str  # /srv/mlflow-artifacts or s3://bucket/mlflow
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 1


def _driver_module(scheme: str) -> str | None:
    """The module a database URI's scheme needs (``postgresql+psycopg2`` -> ``psycopg2``)."""
    database, _, driver = scheme.partition("+")
    return driver or _DEFAULT_DRIVERS.get(database)


def check_backend(uri: str) -> None:
    """A database URI whose driver is importable, else a one-line error saying what to do."""
    scheme = urlparse(uri).scheme
    if scheme.partition("+")[0] not in _DATABASES:
        raise ClipidError(f"--backend-store-uri {uri!r}: not a database URI (one of "
                          f"{', '.join(d + '://' for d in _DATABASES)}; a team uses "
                          "postgresql://user:password@host:5432/mlflow)")
    module = _driver_module(scheme)
    if module and importlib.util.find_spec(module) is None:
        raise ClipidError(f"--backend-store-uri {scheme}://...: the database driver "
                          f"{module!r} is not installed; {_TEAM_HINT}")


def artifacts_location(destination: str) -> str:
    """An ``s3://`` (or other) URI as given; a folder as an absolute path, made if missing."""
    scheme = urlparse(destination).scheme
    if scheme == "s3" and importlib.util.find_spec("boto3") is None:
        raise ClipidError(f"--artifacts-destination {destination}: boto3 is not installed; "
                          f"{_TEAM_HINT}")
    if len(scheme) > 1 and scheme != "file":  # "C:" is a drive letter, not a scheme
        return destination
    folder = Path(destination.removeprefix("file://")).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def server_command(config: ServerConfig) -> list[str]:
    """The ``mlflow server`` command line of ``config`` (checked: driver, destination)."""
    if config.workers < 1:
        raise ClipidError(f"--workers {config.workers}: must be at least 1")
    check_backend(config.backend_store_uri)
    # This environment's mlflow, whatever PATH says (`.venv/bin/clipid server` from anywhere).
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", config.backend_store_uri,
            "--artifacts-destination", artifacts_location(config.artifacts_destination),
            "--serve-artifacts",
            "--host", config.host, "--port", str(config.port),
            "--workers", str(config.workers)]


def server_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ``environ`` (default ``os.environ``) with the job runner and
    telemetry off; a value the user set wins."""
    env = dict(os.environ if environ is None else environ)
    for key, value in _SERVER_ENV.items():
        env.setdefault(key, value)
    return env


def _without_password(arg: str) -> str:
    """``arg`` with a URI's password replaced by ``***`` (the command line is printed)."""
    parts = urlparse(arg)
    if not parts.password:
        return arg
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def serve_tracking(config: ServerConfig) -> None:
    """Replace this process by the server (its pid stays the one a supervisor started)."""
    cmd = server_command(config)
    print(" ".join(_without_password(arg) for arg in cmd), flush=True)
    os.execvpe(cmd[0], cmd, server_env())
