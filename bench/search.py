"""bench/search: the gallery index at a million images, on embeddings shaped like a trained
model's.

Uniform random vectors have no clusters, so recall figures on them say nothing about a real
gallery. This gallery is drawn as a retrieval model's embeddings are laid out: categories, items
around their category's centre, views (photos) around their item's centre, all sharing one mean
direction (CLIP embeddings are far from centred), with offsets concentrated in a few directions
(a decaying spectrum: real embeddings have a low intrinsic dimension). The spreads are set so
that the cosine levels and the spectrum match those of clipid's trained Stage 4 model
(``--trained models/index/stage4`` prints that model's figures beside the generator's).

Queries are new views of gallery items (a new photo of an indexed item): recall@10 against the
exact top 10, and whether the first result is the query's item.

``--part ivf``: exact search and faiss IVF-Flat (``search.faiss`` nlist, several ``nprobe``)
on the full gallery. ``--part hnsw``: HNSW built for at most ``--budget`` seconds, in steps, on
a prefix of the gallery (the largest size this machine builds in that time), then searched at
several ``efSearch``. ``--part threads``: HNSW build time with and without torch's OpenMP
runtime beside faiss's. Target (issue 17): the default faiss configuration reaches recall@10 >=
0.95 at >= 10x exact search's queries per second, one query at a time; the part that measures
the default ``search.faiss.type`` exits non-zero otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import faiss
import numpy as np
import psutil

from clipid.config import FaissParams
from clipid.search.index import ExactIndex, FaissIndex, neighbour_recall

from _report import machine, write_section

CHUNK = 50_000


@dataclass(frozen=True)
class Shape:
    """The generator's knobs. Cosines of unit vectors: other category ~ ``mean``, same category
    ~ ``mean + category``, same item ~ ``mean + category + item`` (the rest is the view)."""

    dim: int = 512              # ViT-B-16's embedding width
    categories: int = 100
    views: int = 5              # gallery images per item (In-shop has ~4.5 per item)
    mean: float = 0.55          # share of the squared norm along the common mean direction
    category: float = 0.09
    item: float = 0.19
    alpha: float = 1.3          # offsets' variance along the k-th direction ~ k^-alpha

    @property
    def view(self) -> float:
        return 1.0 - self.mean - self.category - self.item


class Generator:
    """Deterministic by seed; rows are drawn item by item, items in random order."""

    def __init__(self, size: int, shape: Shape, seed: int = 0):
        self.shape, self.size = shape, size
        rng = np.random.default_rng(seed)
        self.items = -(-size // shape.views)
        basis, _ = np.linalg.qr(rng.standard_normal((shape.dim, shape.dim)))
        scale = np.arange(1, shape.dim + 1, dtype=np.float64) ** (-shape.alpha / 2)
        scale /= np.sqrt((scale ** 2).sum())  # offsets of unit expected squared norm
        self.directions = (scale[:, None] * basis.T).astype(np.float32)  # (dim, dim)
        self.mean = _unit(rng.standard_normal(shape.dim))
        self.category_of_item = rng.integers(shape.categories, size=self.items)
        category_offsets = self.offsets(rng, shape.categories, shape.category)
        # Item centres, unnormalised: items x dim float32 (400 MB for a million images).
        self.centres = np.empty((self.items, shape.dim), dtype=np.float32)
        for start in range(0, self.items, CHUNK):
            stop = min(self.items, start + CHUNK)
            self.centres[start:stop] = self.offsets(rng, stop - start, shape.item) \
                + category_offsets[self.category_of_item[start:stop]]
        self.centres += np.sqrt(shape.mean, dtype=np.float32) * self.mean
        self.row_item = rng.permutation(np.repeat(np.arange(self.items), shape.views))[:size]

    def offsets(self, rng: np.random.Generator, rows: int, share: float) -> np.ndarray:
        z = rng.standard_normal((rows, self.shape.dim), dtype=np.float32)
        return np.sqrt(share, dtype=np.float32) * (z @ self.directions)

    def views_of(self, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _unit(self.centres[items] + self.offsets(rng, len(items), self.shape.view))

    def gallery(self, rows: int | None = None, seed: int = 1) -> np.ndarray:
        rows = self.size if rows is None else rows
        rng = np.random.default_rng(seed)
        out = np.empty((rows, self.shape.dim), dtype=np.float32)  # the one full-size array
        for start in range(0, rows, CHUNK):
            stop = min(rows, start + CHUNK)
            out[start:stop] = self.views_of(self.row_item[start:stop], rng)
        return out

    def queries(self, count: int, rows: int | None = None, seed: int = 2
                ) -> tuple[np.ndarray, np.ndarray]:
        """New views of items drawn from the first ``rows`` gallery rows, and those items."""
        rng = np.random.default_rng(seed)
        pool = self.row_item[: self.size if rows is None else rows]
        items = pool[rng.choice(len(pool), count, replace=False)]
        return self.views_of(items, rng), items


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def structure(vectors: np.ndarray, items: np.ndarray, categories: np.ndarray | None,
              probes: int = 500, seed: int = 0) -> dict[str, float]:
    """The nearest-neighbour structure of a gallery: mean cosines within an item, within a
    category and across, the share of each probe's top 1 / top 10 neighbours (itself left out)
    of its item, the cosine of the 1st and 10th neighbour, and the participation ratio of the
    spectrum (its effective number of dimensions: the spread of cosines between unrelated
    images, which decides how often another item comes close, goes with it)."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(vectors), min(probes, len(vectors)), replace=False)
    scores, ids = ExactIndex(vectors).search(vectors[picks], 11)
    ids, scores = ids[:, 1:], scores[:, 1:]  # the probe itself is first
    same = items[ids] == items[picks][:, None]
    # Every other view of each probe's item, not only the near ones.
    order = np.argsort(items, kind="stable")
    first = np.searchsorted(items[order], items[picks], side="left")
    last = np.searchsorted(items[order], items[picks], side="right")
    own = [vectors[np.setdiff1d(order[a:b], [p])] @ vectors[p]
           for p, a, b in zip(picks, first, last, strict=True) if b - a > 1]
    sample = vectors[rng.choice(len(vectors), min(50_000, len(vectors)), replace=False)]
    lam = np.linalg.eigvalsh(np.cov(sample.T.astype(np.float64)))
    pairs = rng.integers(len(vectors), size=(200_000, 2))
    cos = np.einsum("ij,ij->i", vectors[pairs[:, 0]], vectors[pairs[:, 1]])
    out = {"top1 own item": float(same[:, 0].mean()), "top10 own item": float(same.mean()),
           "cos 1st nn": float(scores[:, 0].mean()), "cos 10th nn": float(scores[:, 9].mean()),
           "effective dimensions": float(lam.sum() ** 2 / (lam ** 2).sum()),
           "cos same item": float(np.concatenate(own).mean())}
    if categories is not None:
        same_cat = categories[pairs[:, 0]] == categories[pairs[:, 1]]
        out["cos same category"] = float(cos[same_cat].mean())
        out["cos other category"] = float(cos[~same_cat].mean())
    else:
        out["cos any two"] = float(cos.mean())
    return out


def trained_gallery(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A gallery index of the ``index`` stage; categories from synthetic data's attributes."""
    import pandas as pd

    from clipid.data.synthetic import CATEGORIES

    vectors = np.load(directory / "embeddings.npy")
    table = pd.read_csv(directory / "gallery.csv", dtype=str)
    info = json.loads((directory / "index.json").read_text(encoding="utf-8"))
    manifest = Path(info["prepared"]) / "manifest.csv"
    if not manifest.is_absolute():  # relative to the workspace of models/index/<model>
        manifest = directory.parents[2] / manifest
    attributes = dict(pd.read_csv(manifest, dtype=str, keep_default_na=False)
                      [["image", "attributes"]].itertuples(index=False))
    by_length = sorted(CATEGORIES, key=len, reverse=True)  # "t-shirt" before "shirt"
    cats = [next((c for c in by_length if c in attributes.get(i, "")), "") for i in table.image]
    return vectors, table["item_id"].to_numpy(), np.array(cats) if all(cats) else None


def rss() -> int:
    return psutil.Process().memory_info().rss


def latencies(index, queries: np.ndarray, k: int = 10) -> tuple[float, float]:
    """p50 and p99 in milliseconds of one query at a time."""
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - start)
    p50, p99 = np.percentile(np.array(times) * 1000, [50, 99])
    return float(p50), float(p99)


@dataclass
class Row:
    index: str
    setting: str
    build_s: float
    memory_mb: float
    p50: float
    p99: float
    qps: float
    recall10: float
    item_first: float

    def markdown(self) -> str:
        return (f"| {self.index} | {self.setting} | {self.build_s:.0f} | {self.memory_mb:,.0f} | "
                f"{self.p50:.2f} | {self.p99:.2f} | {self.qps:,.0f} | {self.recall10:.3f} | "
                f"{self.item_first:.3f} |")


HEADER = ["| index | setting | build s | memory MB | p50 ms | p99 ms | queries/s (batch) | "
          "recall@10 vs exact | first result own item |",
          "|---|---|---|---|---|---|---|---|---|"]


def measure(index, name: str, setting: str, build_s: float, memory_mb: float,
            queries: np.ndarray, items: np.ndarray, item_of: np.ndarray, truth: np.ndarray,
            timed: int) -> Row:
    start = time.perf_counter()
    _, found = index.search(queries, 10)
    qps = len(queries) / (time.perf_counter() - start)
    p50, p99 = latencies(index, queries[:timed])
    first = item_of[np.maximum(found[:, 0], 0)] == items
    row = Row(name, setting, build_s, memory_mb, p50, p99, qps,
              neighbour_recall(truth, found), float(first.mean()))
    print(row.markdown(), flush=True)
    return row


def exact_row(gallery, queries, items, item_of, timed) -> tuple[Row, np.ndarray]:
    exact = ExactIndex(gallery)
    _, truth = exact.search(queries, 10)
    return measure(exact, "exact", "-", 0, gallery.nbytes / 2**20, queries, items, item_of,
                   truth, timed), truth


def verdict(row: Row, exact: Row, name: str) -> tuple[str, bool]:
    """Issue 17's target for ``row``: recall@10 >= 0.95 at >= 10x exact search's queries per
    second, one query at a time (as `clipid search` and `clipid serve` ask them)."""
    speedup = exact.p50 / row.p50
    ok = row.recall10 >= 0.95 and speedup >= 10
    default = " (the default `search.faiss.type`)" if FaissParams().type in name.lower() else ""
    return (f"{name} at the default `search.faiss` settings{default}: recall@10 "
            f"{row.recall10:.3f} (target >= 0.95) at {speedup:.0f}x exact search's single-query "
            f"speed (p50; target >= 10x) and {row.qps / exact.qps:.1f}x its batch queries/s: "
            + ("met." if ok else "NOT met."), ok)


def ivf_part(gen: Generator, gallery: np.ndarray, args) -> tuple[list[str], bool]:
    defaults = FaissParams(type="ivf")
    queries, items = gen.queries(args.queries)
    item_of = gen.row_item
    rows = []
    exact, truth = exact_row(gallery, queries, items, item_of, min(args.timed, 100))
    rows.append(exact)
    ok = False
    for nlist in sorted(set(args.nlist) | {defaults.nlist}):
        params = FaissParams(type="ivf", nlist=nlist, nprobe=defaults.nprobe)
        before = rss()
        start = time.perf_counter()
        ivf = FaissIndex.build(gallery, params)
        build_s, memory_mb = time.perf_counter() - start, (rss() - before) / 2**20
        for nprobe in sorted(set(args.nprobe) | {defaults.nprobe}):
            ivf.index.nprobe = nprobe
            default = nlist == defaults.nlist and nprobe == defaults.nprobe
            row = measure(ivf, "faiss IVF-Flat", f"nlist {ivf.index.nlist}, nprobe {nprobe}"
                          + (" (default)" if default else ""), build_s, memory_mb, queries,
                          items, item_of, truth, args.timed)
            rows.append(row)
            if default:
                line, ok = verdict(row, exact, "IVF-Flat")
        del ivf
    return [*HEADER, *[r.markdown() for r in rows], "", line], ok or FaissParams().type != "ivf"


def hnsw_part(gen: Generator, args) -> tuple[list[str], bool]:
    """Builds in steps of CHUNK rows until the budget is spent: the size reached is the largest
    this machine builds in ``--budget`` seconds."""
    defaults = FaissParams(type="hnsw")
    gallery = gen.gallery()
    index = faiss.IndexHNSWFlat(gen.shape.dim, defaults.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = defaults.ef_construction
    before, start, built = rss(), time.perf_counter(), 0
    steps = []
    while built < len(gallery) and time.perf_counter() - start < args.budget:
        index.add(gallery[built:built + CHUNK])
        built = index.ntotal
        steps.append(f"{built:,} in {time.perf_counter() - start:.0f} s")
        print(f"hnsw: {steps[-1]}", flush=True)
    build_s, memory_mb = time.perf_counter() - start, (rss() - before) / 2**20
    prefix = gallery[:built]
    queries, items = gen.queries(args.queries, rows=built)
    exact, truth = exact_row(prefix, queries, items, gen.row_item, min(args.timed, 100))
    hnsw = FaissIndex(index, defaults)
    rows = [exact]
    for ef in sorted(set(args.ef_search) | {defaults.ef_search}):
        hnsw.index.hnsw.efSearch = ef
        rows.append(measure(hnsw, f"faiss HNSW, M {defaults.hnsw_m}, efConstruction "
                            f"{defaults.ef_construction}", f"efSearch {ef}"
                            + (" (default)" if ef == defaults.ef_search else ""), build_s,
                            memory_mb, queries, items, gen.row_item, truth, args.timed))
        if ef == defaults.ef_search:
            line, ok = verdict(rows[-1], exact, "HNSW")
    return [f"HNSW over the first {built:,} vectors of the gallery, built in steps of "
            f"{CHUNK:,} until {args.budget:.0f} s were spent ({'; '.join(steps)}); exact search "
            "over the same vectors for reference.", "", *HEADER,
            *[r.markdown() for r in rows], "", line], ok or FaissParams().type != "hnsw"


# (torch, when torch starts its OpenMP pool, faiss's OpenMP threads); torch gets 2 threads.
TRIALS = (("not imported", "none", 2), ("not imported", "none", 1),
          ("run first", "before", 2), ("run first", "before", 1),
          ("run after faiss is imported", "after", 2))


def thread_trial(torch_when: str, threads: int, rows: int) -> dict[str, float]:
    """One HNSW build in this process: wall and CPU seconds, OpenMP threads, libgomp copies."""
    import resource

    def run_torch() -> None:
        import torch

        torch.set_num_threads(2)
        x = torch.randn(256, 256)
        (x @ x).sum().item()  # starts torch's own OpenMP pool

    if torch_when == "before":
        run_torch()
    faiss.omp_set_num_threads(threads)
    if torch_when == "after":
        run_torch()
    vectors = Generator(rows, Shape()).gallery()
    index = faiss.IndexHNSWFlat(vectors.shape[1], FaissParams().hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = FaissParams().ef_construction
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, start = usage.ru_utime + usage.ru_stime, time.perf_counter()
    index.add(vectors)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    gomp = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line}
    return {"wall": time.perf_counter() - start, "cpu": usage.ru_utime + usage.ru_stime - cpu0,
            "threads": faiss.omp_get_max_threads(), "libgomp": len(gomp)}


def threads_part(args) -> list[str]:
    """Each trial in a fresh process, twice, interleaved."""
    import subprocess

    results: dict[int, list[dict]] = {i: [] for i in range(len(TRIALS))}
    for _ in range(2):
        for i, (_, when, threads) in enumerate(TRIALS):
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--part",
                                  "trial", "--trial", f"{when},{threads}", "--size",
                                  str(args.size)],
                                 capture_output=True, text=True, check=True).stdout
            results[i].append(json.loads(out.strip().splitlines()[-1]))
            print(TRIALS[i], results[i][-1], flush=True)
    lines = ["| torch | OpenMP threads of faiss | libgomp copies loaded | build wall s "
             "(best of 2) | build CPU s (best of 2) | CPU / wall |", "|---|---|---|---|---|---|"]
    for i, (what, _, _threads) in enumerate(TRIALS):
        best = min(results[i], key=lambda r: r["wall"])
        cpu = min(r["cpu"] for r in results[i])
        lines.append(f"| {what} | {best['threads']} | "
                     f"{best['libgomp']} | {best['wall']:.1f} | {cpu:.1f} | "
                     f"{cpu / best['wall']:.2f} |")
    return [f"HNSW (M {FaissParams().hnsw_m}, efConstruction {FaissParams().ef_construction}) "
            f"over {args.size:,} generated vectors, each build in a fresh process, every "
            "configuration twice, interleaved. torch runs a matrix product on 2 threads of its "
            "own OpenMP runtime (torch/lib/libgomp) before or after faiss (whose wheel "
            "bundles another libgomp) is loaded.", "",
            *lines]


def describe(shape: Shape, args, gen: Generator, gallery: np.ndarray,
             trained: dict | None) -> list[str]:
    rows = min(len(gallery), 200_000)
    items = gen.row_item[:rows]
    stats = structure(gallery[:rows], items, gen.category_of_item[items])
    keys = list(stats) + ([k for k in trained if k not in stats] if trained else [])
    lines = [f"| | generated (first {rows:,}) |" + (" trained Stage 4 |" if trained else ""),
             "|---|---|" + ("---|" if trained else "")]
    for k in keys:
        row = f"| {k} | {stats.get(k, float('nan')):.3f} |"
        lines.append(row + (f" {trained.get(k, float('nan')):.3f} |" if trained else ""))
    knobs = ", ".join(f"{f.name} {getattr(shape, f.name)}" for f in fields(shape))
    return [f"Generator (`bench/search.py`, `Generator`): {args.size:,} unit vectors; {knobs}, "
            f"view {shape.view:.2f}: {shape.categories} categories, {gen.items:,} items of "
            f"{shape.views} views. Each vector is normalise(sqrt(mean) m + c + i + v): m one "
            "mean direction, c the category's offset, i the item's, v the view's, each "
            "Gaussian with squared norm ~ its share, along a fixed random rotation with "
            f"variance ~ k^-{shape.alpha} in the k-th direction. {args.queries} queries: new "
            "views of random gallery items.", "", *lines]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("ivf", "hnsw", "threads", "trial"), default="ivf")
    parser.add_argument("--trial", help=argparse.SUPPRESS)  # threads' child: "when,threads"
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000, help="for recall and throughput")
    parser.add_argument("--timed", type=int, default=200, help="single queries timed")
    parser.add_argument("--nlist", type=int, nargs="+", default=[])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--budget", type=float, default=420, help="HNSW build seconds")
    parser.add_argument("--trained", type=Path, help="a models/index/<model> to compare with")
    args = parser.parse_args()
    if args.part == "trial":
        when, threads = args.trial.split(",")
        print(json.dumps(thread_trial(when, int(threads), args.size)))
        return 0
    if args.part == "threads":
        write_section("bench/search (HNSW threads)", "\n".join(
            [*threads_part(args), "", f"Machine (shared with other jobs, noisy): {machine()}; "
             f"faiss {faiss.__version__}."]))
        return 0
    shape = Shape()
    gen = Generator(args.size, shape)
    if args.part == "hnsw":
        body, ok = hnsw_part(gen, args)
        write_section("bench/search (HNSW)", "\n".join(
            [*body, "", f"Machine (shared with other jobs, noisy): {machine()}; faiss "
             f"{faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP thread(s)."]))
        return 0 if ok else 1
    trained = structure(*trained_gallery(args.trained)) if args.trained else None
    gallery = gen.gallery()
    print(f"gallery {gallery.shape} drawn", flush=True)
    table, ok = ivf_part(gen, gallery, args)
    body = [*describe(shape, args, gen, gallery, trained), "", *table, "",
            f"Machine (shared with other jobs, noisy): {machine()}; faiss {faiss.__version__}, "
            f"{faiss.omp_get_max_threads()} OpenMP thread(s)."]
    write_section("bench/search", "\n".join(body))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
