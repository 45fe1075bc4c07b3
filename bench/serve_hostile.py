"""bench/serve (hostile mix): `clipid serve` under uploads made to hurt, on loopback only.

The server of bench/serve (its own process, 127.0.0.1, the same workspace) answers for
``--seconds`` (30) to 8 hostile clients, each sending in a loop images just under
``serve.max_pixels`` (a PNG of a few hundred KB that decodes to ~150 MB) and, every
``--bomb-every``-th request, a header-only bomb (30,000 x 30,000 pixels claimed in 100 bytes); it
does not wait after a refusal. Alongside, one ordinary client sends, one after another, uploaded
prepared images and captions as text. A sampler reads the server's resident memory every 20 ms.

Targets (issue 29): peak resident memory at most 1.5x the idle server's; the ordinary requests
all answered (no 5xx: a 503 to a hostile upload is the intended backpressure, counted apart);
the ordinary requests' p99 under 1 s. The script exits non-zero otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import PIL
import psutil
from PIL import Image, ImageDraw

from clipid.config import load_params
from serve import REPO, has_index, multipart, queries, start_server, tiny_workspace

from _report import machine, write_section

BOMB = (30_000, 30_000)


def just_under(max_pixels: int) -> bytes:
    """A PNG with ``max_pixels`` minus a row: smooth bands and discs, so that decoding it is
    real work (every row inflated and unfiltered) while the file stays small."""
    side = int(max_pixels ** 0.5)
    width, height = side, max_pixels // side - 1
    im = Image.new("RGB", (width, height), (40, 90, 160))
    draw = ImageDraw.Draw(im)
    rng = np.random.default_rng(0)
    for _ in range(60):
        x, y, r = rng.integers(0, width), rng.integers(0, height), rng.integers(50, width // 6)
        draw.ellipse([x - r, y - r, x + r, y + r],
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    out = io.BytesIO()
    im.save(out, format="PNG", compress_level=6)
    return out.getvalue()


def bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", *BOMB, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


def post(conn: http.client.HTTPConnection, body: bytes, ctype: str) -> int:
    conn.request("POST", "/api/search", body, {"Content-Type": ctype})
    response = conn.getresponse()
    response.read()
    return response.status


class Mix:
    """The hostile clients, the ordinary one and the memory sampler, all until ``deadline``."""

    def __init__(self, port: int, server: psutil.Process, deadline: float):
        self.port, self.server, self.deadline = port, server, deadline
        self.hostile: Counter = Counter()          # status (0: connection error) -> count
        self.normal: list[tuple[str, float, int]] = []  # (kind, seconds, status)
        self.peak_rss = 0
        self.lock = threading.Lock()

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def send(self, conn: http.client.HTTPConnection, body: bytes, ctype: str
             ) -> tuple[int, http.client.HTTPConnection]:
        """The status (0: the connection failed) and the connection to go on with."""
        try:
            return post(conn, body, ctype), conn
        except (OSError, http.client.HTTPException):
            conn.close()
            return 0, self.connection()

    def attacker(self, large: bytes, bomb_every: int, seed: int) -> None:
        conn, i = self.connection(), seed
        while time.monotonic() < self.deadline:
            i += 1
            kind = "bomb" if i % bomb_every == 0 else "large"
            status, conn = self.send(conn, *multipart(f"{kind}.png",
                                                      bomb() if kind == "bomb" else large))
            with self.lock:
                self.hostile[(kind, status)] += 1
        conn.close()

    def ordinary(self, images: list[tuple[str, bytes]], texts: list[str]) -> None:
        conn, i = self.connection(), 0
        while time.monotonic() < self.deadline:
            if i % 2 == 0:
                kind, (body, ctype) = "image", multipart(*images[(i // 2) % len(images)])
            else:
                kind = "text"
                body, ctype = json.dumps({"text": texts[(i // 2) % len(texts)]}).encode(), \
                    "application/json"
            began = time.perf_counter()
            status, conn = self.send(conn, body, ctype)
            self.normal.append((kind, time.perf_counter() - began, status))
            i += 1
            time.sleep(0.05)  # an ordinary user: a query now and then, not a flood
        conn.close()

    def sample(self) -> None:
        while time.monotonic() < self.deadline + 1:
            self.peak_rss = max(self.peak_rss, self.server.memory_info().rss)
            time.sleep(0.02)


def run_mix(port: int, server: psutil.Process, args, images, texts, large: bytes) -> Mix:
    mix = Mix(port, server, time.monotonic() + args.seconds)
    threads = [threading.Thread(target=mix.attacker, args=(large, args.bomb_every, n))
               for n in range(args.clients)]
    threads += [threading.Thread(target=mix.ordinary, args=(images, texts)),
                threading.Thread(target=mix.sample)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return mix


def warm_up(port: int, images, texts, count: int = 20) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for i in range(count):
        post(conn, *multipart(*images[i % len(images)]))
        post(conn, json.dumps({"text": texts[i % len(texts)]}).encode(), "application/json")
    conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--bomb-every", type=int, default=4)
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipid-bench-hostile-") as tmp:
        root = args.root.resolve()
        what = f"the workspace `{root.name}`"
        if not (root / "params.yaml").is_file() or not has_index(root):
            root, what = tiny_workspace(Path(tmp)), "a tiny workspace (40 synthetic items, " \
                "Stage 1's random tiny CLIP)"
        serve = load_params(root / "params.yaml").serve
        images, texts = queries(root)
        large = just_under(serve.max_pixels)
        proc = start_server(root, args.port, Path(tmp) / "serve.log")
        try:
            server = psutil.Process(proc.pid)
            warm_up(args.port, images, texts)
            time.sleep(1)
            idle = server.memory_info().rss
            load = os.getloadavg()[0]
            mix = run_mix(args.port, server, args, images, texts, large)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return report(args, what, serve, len(large), idle, load, mix)


def report(args, what: str, serve, large_bytes: int, idle: int, load: float, mix: Mix) -> int:
    times = np.array([t for _, t, s in mix.normal if s == 200]) * 1000
    p50, p99 = np.percentile(times, [50, 99]) if len(times) else (np.nan, np.nan)
    normal = Counter(s for _, _, s in mix.normal)
    ratio = mix.peak_rss / idle
    hostile = ", ".join(f"{kind} {status or 'connection error'}: {n}"
                        for (kind, status), n in sorted(mix.hostile.items()))
    goals = [(ratio <= 1.5, f"peak resident memory <= 1.5x idle ({ratio:.2f}x)"),
             (all(s == 200 for s in normal), "every ordinary request answered (no 5xx)"),
             (p99 < 1000, f"ordinary p99 < 1 s ({p99:.0f} ms)")]
    side = int(serve.max_pixels ** 0.5)
    body = "\n".join([
        f"`clipid serve` on {what}, serve.max_pixels {serve.max_pixels:,}, max_concurrent "
        f"{serve.max_concurrent}, max_queued {serve.max_queued}. For {args.seconds:.0f} s, "
        f"{args.clients} hostile clients each send in a loop, without waiting, a "
        f"{side} x {serve.max_pixels // side - 1} PNG ({large_bytes / 1024:.0f} KB, just under "
        f"the limit) and every {args.bomb_every}th time a header-only bomb ({BOMB[0]:,} x "
        f"{BOMB[1]:,}); one ordinary client sends prepared images and captions one after "
        "another (50 ms apart) alongside. A 503 (with Retry-After) is the intended answer to "
        "hostile uploads the queue has no room for: it refuses the dearest waiting request, so "
        "an ordinary query is never the one refused; bombs are refused (413) from their header "
        "before the queue.", "",
        "| | requests | p50 ms | p99 ms |", "|---|---:|---:|---:|",
        f"| ordinary (answered) | {len(times)} of {len(mix.normal)} | {p50:.0f} | {p99:.0f} |",
        "", f"Ordinary statuses: {dict(sorted(normal.items()))}. Hostile: {hostile}.", "",
        f"Server resident memory: idle {idle / 2**20:.0f} MiB (after 40 warm-up queries), "
        f"peak {mix.peak_rss / 2**20:.0f} MiB ({ratio:.2f}x).", "",
        *[f"- [{'x' if ok else ' '}] {text}" for ok, text in goals], "",
        f"Machine (shared with other jobs, noisy; load average {load:.1f} at the start): "
        f"{machine()}; Pillow {PIL.__version__}; OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}.",
    ])
    write_section("bench/serve (hostile mix)", body, after="bench/serve")
    print(body)
    return 0 if all(ok for ok, _ in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
