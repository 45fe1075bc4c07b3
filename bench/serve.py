"""bench/serve: a bounded load test of `clipid serve` on loopback.

Starts the server (its own process, 127.0.0.1 only) on a workspace laid out like the repository
after `dvc repro index` (``--root``, default the repository; a tiny one with Stage 1's model is
built in a temporary folder when the root has no index), then sends 500 requests from 8
concurrent clients, every other one an uploaded prepared image and the rest a caption as text.
Reports p50/p99 latency and throughput, counts errors, and reads the server's resident memory
after the first 100 requests and after the last.

Targets (issue 17): no errors; resident memory after the run at most 10% above its value after
the first 100 requests. The script exits non-zero otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil

from clipid.config import load_params, params_from_dict
from clipid.workspace import Workspace

from _report import machine, write_section

REPO = Path(__file__).resolve().parents[1]
TINY = {"data": {"synthetic": {"items": 40, "views": 4, "image_size": 64}, "workers": 0},
        "search": {"model": {"image": "stage1", "text": "stage1"}}}


def tiny_workspace(root: Path) -> Path:
    """Prepared synthetic data and a Stage 1 index, as `dvc repro index` would leave them."""
    from clipid.stages.clean_captions import clean_captions
    from clipid.stages.index import index_stage
    from clipid.stages.prepare import prepare

    params = params_from_dict(TINY)
    (root / "params.yaml").write_text(json.dumps(TINY))
    prepare(params, Workspace(root))
    clean_captions(params, Workspace(root))
    cwd = Path.cwd()
    os.chdir(root)
    try:
        os.environ["DVC_ROOT"] = str(root)
        index_stage(params)  # in the working directory: the gallery names relative paths
    finally:
        os.chdir(cwd)
    return root


def has_index(root: Path) -> bool:
    params = load_params(root / "params.yaml")
    return all((Workspace(root).index_dir(m) / "index.json").is_file()
               for m in (params.search.model.image, params.search.model.text))


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"'
            f"\r\nContent-Type: image/png\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class Load:
    """Requests ``start .. stop`` spread over ``clients`` threads, one keep-alive connection
    each; request ``i`` is an image when ``i`` is even."""

    def __init__(self, port: int, images: list[tuple[str, bytes]], texts: list[str]):
        self.port, self.images, self.texts = port, images, texts
        self.results: list[tuple[int, str, float, int]] = []  # (i, kind, seconds, status)
        self.lock = threading.Lock()

    def request(self, conn: http.client.HTTPConnection, i: int) -> None:
        if i % 2 == 0:
            kind, (name, data) = "image", self.images[(i // 2) % len(self.images)]
            body, ctype = multipart(name, data)
        else:
            kind = "text"
            body = json.dumps({"text": self.texts[(i // 2) % len(self.texts)]}).encode()
            ctype = "application/json"
        start = time.perf_counter()
        conn.request("POST", "/api/search", body, {"Content-Type": ctype})
        response = conn.getresponse()
        payload = response.read()
        elapsed = time.perf_counter() - start
        status = response.status if json.loads(payload).get("results") else -response.status
        with self.lock:
            self.results.append((i, kind, elapsed, status))

    def run(self, start: int, stop: int, clients: int) -> float:
        todo = iter(range(start, stop))

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            while True:
                with self.lock:
                    i = next(todo, None)
                if i is None:
                    break
                try:
                    self.request(conn, i)
                except (OSError, http.client.HTTPException, json.JSONDecodeError):
                    with self.lock:
                        self.results.append((i, "error", 0.0, 0))
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            conn.close()

        began = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - began


def start_server(root: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "DVC_ROOT": str(root), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "clipid", "serve", "--port", str(port)],
                            cwd=root, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not answer within 300 s:\n{log.read_text()}")


def queries(root: Path, count: int = 50) -> tuple[list[tuple[str, bytes]], list[str]]:
    prepared = root / "data" / "prepared"
    texts = json.loads((prepared / "image_texts.json").read_text(encoding="utf-8"))
    rng = np.random.default_rng(0)
    names = sorted(texts)
    picks = [names[i] for i in rng.choice(len(names), min(count, len(names)), replace=False)]
    return [(Path(p).name, (prepared / p).read_bytes()) for p in picks], [texts[p] for p in picks]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warm", type=int, default=100, help="requests before the first RSS")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipid-bench-serve-") as tmp:
        root = args.root.resolve()
        what = "the repository's outputs" if root == REPO else \
            f"a workspace after `dvc repro index` (`{root.name}`)"
        if not (root / "params.yaml").is_file() or not has_index(root):
            root, what = tiny_workspace(Path(tmp)), "a tiny workspace (40 synthetic items, " \
                "Stage 1's random tiny CLIP for image and text)"
        images, texts = queries(root)
        proc = start_server(root, args.port, Path(tmp) / "serve.log")
        try:
            server = psutil.Process(proc.pid)
            load = Load(args.port, images, texts)
            first_s = load.run(0, args.warm, args.clients)
            rss_warm = server.memory_info().rss
            rest_s = load.run(args.warm, args.requests, args.clients)
            rss_end = server.memory_info().rss
            health = json.loads(http_get(args.port, "/api/health"))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return report(args, what, load.results, first_s + rest_s, rss_warm, rss_end, health)


def http_get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    return conn.getresponse().read()


def report(args, what: str, results, seconds: float, rss_warm: int, rss_end: int,
           health: dict) -> int:
    errors = sum(1 for r in results if r[3] != 200)
    growth = rss_end / rss_warm - 1
    rows = []
    for kind in ("image", "text", "all"):
        times = np.array([r[2] for r in results if r[3] == 200 and kind in (r[1], "all")])
        p50, p99 = np.percentile(times * 1000, [50, 99]) if len(times) else (np.nan, np.nan)
        rows.append(f"| {kind} | {len(times)} | {p50:.0f} | {p99:.0f} |")
    models = ", ".join(f"{m} ({h['images']} images, {h['backend']})"
                       for m, h in health["models"].items())
    ok = errors == 0 and growth <= 0.10
    body = "\n".join([
        f"`clipid serve` on {what}: models {models}. {args.requests} requests "
        f"(every other one an uploaded prepared image, the others a caption as JSON text) from "
        f"{args.clients} concurrent clients over loopback, one keep-alive connection each. "
        "Latency: from sending a request to reading its whole answer.", "",
        "| queries | answered | p50 ms | p99 ms |", "|---|---:|---:|---:|", *rows, "",
        f"Throughput {len(results) / seconds:.1f} requests/s ({seconds:.1f} s in all); errors "
        f"{errors}. Server resident memory {rss_warm / 2**20:.0f} MiB after the first "
        f"{args.warm} requests, {rss_end / 2**20:.0f} MiB after all ({growth:+.1%}).", "",
        f"- [{'x' if errors == 0 else ' '}] no errors",
        f"- [{'x' if growth <= 0.10 else ' '}] memory growth <= 10% over the first "
        f"{args.warm} requests", "",
        f"Machine (shared with other jobs, noisy): {machine()}; OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}.",
    ])
    write_section("bench/serve", body)
    print(body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
