"""bench/fingerprint: what the ``fingerprint`` stage costs on every ``dvc repro`` at 100,000 images.

Two trees of 100,000 one-byte images, each in a real layout: In-shop-like (``img/<gender>/
<category>/<item>/`` with 10 images per item folder, plus a 100,000-line partition file) and
11k-Hands-like (one flat ``Hands/`` folder, plus ``HandInfo.csv``). Timed: clipid's fingerprint
(``os.scandir``), the same listing written the obvious way (``pathlib.Path.rglob`` and a ``stat``
per file), interleaved, best of several runs; and the whole stage as DVC runs it (``python -m
clipid fingerprint``: interpreter start, imports, walk, write). Page and dentry caches are warm,
as on every repro after the first. Target (issue 19): under 1 s per 100,000 files.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clipid.config import params_from_dict
from clipid.data.fingerprint import fingerprint_json

from _report import machine, write_section

N_FILES = 100_000
TARGET_S = 1.0


def _touch_all(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"x")
        os.close(fd)


def inshop_tree(root: Path, n: int) -> None:
    folders = [root / "img" / g / f"cat_{c:02d}" / f"id_{i:08d}"
               for g in ("MEN", "WOMEN") for c in range(10) for i in range(n // 200)]
    paths = []
    for folder in folders:
        folder.mkdir(parents=True)
        paths += [folder / f"{k:02d}_{k % 4}_front.jpg" for k in range(10)]
    _touch_all(paths)
    (root / "Eval").mkdir()
    lines = [str(len(paths)), "image_name item_id evaluation_status"]
    lines += [f"{p.relative_to(root).as_posix()} {p.parent.name} train" for p in paths]
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def hands_tree(root: Path, n: int) -> None:
    (root / "Hands").mkdir(parents=True)
    names = [f"Hand_{k:07d}.jpg" for k in range(n)]
    _touch_all([root / "Hands" / name for name in names])
    rows = [f"{k // 10:07d},27,male,fair,0,0,dorsal right,{name},0" for k, name in
            enumerate(names)]
    (root / "HandInfo.csv").write_text("id,age,gender,skinColor,accessories,nailPolish,"
                                       "aspectOfHand,imageName,irregularities\n"
                                       + "\n".join(rows) + "\n")


def rglob_listing(root: Path, folder: str) -> str:
    """The same listing with pathlib: one ``stat`` per path, a second one for ``is_file``."""
    entries = sorted((p.relative_to(root).as_posix(), p.stat()) for p in (root / folder).rglob("*")
                     if p.is_file())
    digest = hashlib.sha256()
    for rel, info in entries:
        digest.update(b"%s\0%d\0%d\n" % (os.fsencode(rel), info.st_size, info.st_mtime_ns))
    return digest.hexdigest()


def best_of(runs: int, contenders: dict) -> dict[str, tuple[float, float]]:
    """name -> (best wall s, best CPU s of this process: user + system, what the walk itself
    costs while other processes compete for the cores)."""
    best = {name: (float("inf"), float("inf")) for name in contenders}
    for _ in range(runs):
        for name, func in contenders.items():  # interleaved: load spikes hit both
            wall, cpu = time.perf_counter(), time.process_time()
            func()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def stage_seconds(root: Path, source: str, scratch: Path, runs: int) -> tuple[float, float]:
    """Best wall and CPU (user + system) seconds of the stage's whole process."""
    (scratch / "params.yaml").write_text(f"data:\n  source: {source}\n  root: {root}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    best_wall = best_cpu = float("inf")
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "clipid", "fingerprint"], cwd=scratch, env=env,
                       check=True, capture_output=True)
        best_wall = min(best_wall, time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best_cpu = min(best_cpu, after.ru_utime + after.ru_stime - before.ru_utime
                       - before.ru_stime)
    return best_wall, best_cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=N_FILES)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to build the trees")
    args = parser.parse_args()
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="clipid-bench-", dir=args.dir) as tmp:
        for source, folder, build in (("inshop", "img", inshop_tree),
                                      ("hands11k", "Hands", hands_tree)):
            root = Path(tmp) / source
            build(root, args.files)
            data = params_from_dict({"data": {"source": source, "root": str(root)}}).data
            best = best_of(args.runs, {"clipid": lambda d=data: fingerprint_json(d),
                                       "rglob": lambda r=root, f=folder: rglob_listing(r, f)})
            stage_wall, stage_cpu = stage_seconds(root, source, Path(tmp), args.runs)
            (wall, cpu), (_, rglob_cpu) = best["clipid"], best["rglob"]
            ok &= cpu * 100_000 / args.files < TARGET_S
            rows.append(f"| {source} ({folder}/) | {args.files:,} | {cpu:.3f} | {wall:.3f} | "
                        f"{rglob_cpu:.3f} ({rglob_cpu / cpu:.1f}x) | {stage_cpu:.3f} | "
                        f"{stage_wall:.3f} |")
            print(rows[-1], flush=True)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    body = (__doc__.split("\n\n", 1)[1].strip() + f"\nBest of {args.runs} runs; temporary "
            f"folder on `{args.dir or tempfile.gettempdir()}` (ext4); 1-minute load average "
            f"{load} on 2 cores at the end (the machine is shared: wall times include waiting "
            "for a core; CPU time is the process's user + system time, what the walk costs).\n"
            f"Machine: {machine()}.\n\n"
            "| layout | images | fingerprint CPU (s) | fingerprint wall (s) | pathlib rglob + stat "
            "CPU (s) | whole stage CPU (s) | whole stage wall (s) |\n"
            "|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
            f"- [{'x' if ok else ' '}] fingerprint under {TARGET_S:.0f} s (CPU) per 100,000 files")
    write_section("bench/fingerprint", body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
