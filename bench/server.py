"""bench/server: what an MLflow tracking server costs a team's machine (issue 25).

Starts, one after the other on the same store, MLflow 3.17's ``mlflow server`` as a team would
write it (``--backend-store-uri``, ``--artifacts-destination``, everything else default) and
``clipid server`` (one worker, MLflow's GenAI job runner off), waits until each answers
``/health``, lets it settle, then counts its processes and their memory with psutil: the sum of
RSS (what ``top`` shows, shared pages counted in every process) and of PSS (shared pages split
between the processes that share them: the honest total). The store's tables are made first and
timed apart. Target: ``clipid server`` runs at
most 3 processes in under 1 GiB of PSS.

    python bench/server.py                                  # a SQLite store in a temporary folder
    python bench/server.py --backend-store-uri postgresql://clipid@127.0.0.1:5432/mlflow
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from clipid.tracking_server import ServerConfig, server_command, server_env

from _report import machine, write_section

SETTLE_S = 10  # after /health answers: the job runner starts its consumers late
START_S = 300
MAX_PROCESSES, MAX_PSS_GIB = 3, 1.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str) -> float:
    start = time.monotonic()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() - start < START_S:
        if proc.poll() is not None:
            sys.exit(f"{' '.join(proc.args)} exited with {proc.returncode}")
        with contextlib.suppress(OSError), opener.open(url, timeout=5) as response:
            if response.status == 200:
                return time.monotonic() - start
        time.sleep(0.25)
    sys.exit(f"{url} did not answer within {START_S} s")


def footprint(pid: int) -> tuple[int, float, float]:
    """(processes, RSS GiB, PSS GiB) of ``pid`` and all its descendants."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    memory = [p.memory_full_info() for p in procs]
    return (len(procs), sum(m.rss for m in memory) / 2**30, sum(m.pss for m in memory) / 2**30)


def measure(cmd: list[str], env: dict[str, str], port: int) -> dict[str, float]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        up = wait_until_up(proc, f"http://127.0.0.1:{port}/health")
        time.sleep(SETTLE_S)
        processes, rss, pss = footprint(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    return {"up": up, "processes": processes, "rss": rss, "pss": pss}


def contenders(backend: str, artifacts: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Name -> (command, environment) of the two servers, each on a port of its own."""
    default_port, clipid_port = free_port(), free_port()
    default = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
               "--port", str(default_port)]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    ours = server_command(ServerConfig(backend, str(artifacts), port=clipid_port))
    return {"mlflow server (defaults)": (default, env), "clipid server": (ours, server_env())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend-store-uri", help="default: SQLite in a temporary folder")
    args = parser.parse_args()
    import mlflow

    with tempfile.TemporaryDirectory(prefix="clipid-bench-server-") as tmp:
        backend = args.backend_store_uri or f"sqlite:///{tmp}/mlflow.db"
        schema = time.monotonic()
        mlflow.MlflowClient(backend).search_experiments()  # tables made before, timed apart
        schema = time.monotonic() - schema
        results = {}
        for name, (cmd, env) in contenders(backend, Path(tmp) / "artifacts").items():
            port = int(cmd[cmd.index("--port") + 1])
            results[name] = measure(cmd, env, port)
    store = backend.split(":", 1)[0].split("+")[0]
    rows = [f"| {name} | {r['processes']} | {r['rss']:.2f} | {r['pss']:.2f} | {r['up']:.1f} |"
            for name, r in results.items()]
    ours = results["clipid server"]
    met = ours["processes"] <= MAX_PROCESSES and ours["pss"] < MAX_PSS_GIB
    body = "\n".join([
        f"An MLflow tracking server on a {store} store with proxied artifacts, measured "
        f"{SETTLE_S} s after it first answers `/health` (psutil, the server and all its "
        "descendants). RSS counts shared pages in every process; PSS splits them.",
        f"Machine: {machine()}, MLflow {mlflow.__version__}.", "",
        "| server | processes | RSS GiB | PSS GiB | up after s |", "|---|---:|---:|---:|---:|",
        *rows, "",
        f"Creating the store's tables first (MLflow's migrations, once per database): "
        f"{schema:.1f} s.", "",
        f"- [{'x' if met else ' '}] clipid server: at most {MAX_PROCESSES} processes and under "
        f"{MAX_PSS_GIB:.0f} GiB PSS",
    ])
    write_section("bench/server", body, after="bench/tracking")
    print(body)
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
