"""Stage ``prepare``: any source -> ``data/prepared/`` (resized image cache + one manifest).

Outputs:
- ``data/prepared/images/``: every usable image, decoded, converted to RGB, EXIF-rotated and
  resized once so its shorter side is ``data.cache_size``;
- ``data/prepared/manifest.csv``: one row per image and draw (``split_index``);
- ``data/prepared/rejected.csv``: every input image that was not used, with the reason: unusable
  files (counted as ``rejected``) and images the data set's protocol leaves out, such as
  Market-1501's junk boxes (counted as ``excluded``, and not against
  ``data.max_rejected_fraction``);
- ``metrics/data.json``: image and identity counts per split, and the numbers rejected and
  excluded.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict
from functools import partial
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

from clipid.checks import input_size
from clipid.config import Params
from clipid.data.images import ImageRejected, cache_image
from clipid.data.sources import SPLITS, Record, SourceError, read_source
from clipid.errors import ClipidError
from clipid.workspace import Workspace

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("image", "item_id", "split", "split_index", "camera", "caption", "attributes",
                    "source_image")


# Below this many images a process pool costs more than it saves.
POOL_MIN_IMAGES = 64


class PrepareError(ClipidError, RuntimeError):
    """The data set is not usable as a whole (too many rejects, an identity with no image)."""


def cached_name(source_path: str, fmt: str) -> str:
    """``img/MEN/x/01_front.jpg`` -> ``img/MEN/x/01_front_jpg.png``: unique and readable."""
    path = Path(source_path)
    stem = f"{path.stem}_{path.suffix.lstrip('.').lower()}" if path.suffix else path.stem
    return (path.parent / f"{stem}.{fmt}").as_posix()


def _cache_one(job: tuple[str, str], root: Path, out_dir: Path, size: int) -> str | None:
    """Returns None on success, else the rejection reason (so workers never raise)."""
    source, target = job
    try:
        cache_image(root / source, out_dir / target, size, root=root)
    except ImageRejected as exc:
        return str(exc)
    return None


def _unique_images(records: Iterable[Record]) -> dict[str, str]:
    """source path -> identity, refusing an image listed under two identities."""
    owner: dict[str, str] = {}
    for rec in records:
        previous = owner.setdefault(rec.path, rec.item_id)
        if previous != rec.item_id:
            raise SourceError(f"image {rec.path!r} is listed under two identities: "
                              f"{previous!r} and {rec.item_id!r}")
    return owner


def prepare(params: Params, workspace: Workspace | None = None) -> dict:
    """Run the stage into the workspace's ``data/prepared/``; returns the content written to
    its ``metrics/data.json``."""
    workspace = workspace or Workspace()
    out_dir, metrics_path, rejected_file = (workspace.prepared, workspace.data_metrics,
                                            workspace.rejected)
    data = params.data
    _warn_upscaling(params)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a rerun must not keep images of an earlier source
    out_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="clipid-") as scratch:
        root, listed = read_source(data, Path(scratch))
        excluded = [rec for rec in listed if rec.excluded]
        records = [rec for rec in listed if not rec.excluded]
        owner = _unique_images(records)
        jobs = [(src, cached_name(src, data.cache_format)) for src in owner]
        rejected = _cache_all(jobs, root, workspace.images, data.cache_size, data.workers)

    kept = [rec for rec in records if rec.path not in rejected]
    dropped: list[tuple[str, str, str]] = []
    n_draws = 0
    if data.drop_empty_identities:
        kept, dropped, n_draws = _drop_empty(owner, records, kept)
    rows = [(rec.path, rec.item_id, rec.excluded) for rec in excluded]
    rows += [(src, owner[src], reason) for src, reason in rejected.items()]
    _write_csv(rejected_file, ("source_image", "item_id", "reason"), rows + dropped)
    _check_fraction(owner, rejected, data.max_rejected_fraction, rejected_file)
    if not data.drop_empty_identities:
        _check_identities(owner, kept, rejected_file)
    target = dict(jobs)
    _write_csv(workspace.manifest, MANIFEST_COLUMNS, [_manifest_row(rec, target) for rec in kept])

    summary = _summarise(kept, len(rejected), len(excluded), data.source)
    summary["dropped_identities"] = sum(1 for _, _, why in dropped if why.startswith(DROPPED_ID))
    summary["dropped_draws"] = n_draws
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info("prepared %d images (%d rejected, %d excluded) into %s",
             len(owner) - len(rejected), len(rejected), len(excluded), out_dir)
    if dropped:
        log.warning("data.drop_empty_identities: dropped %d identities with no usable image and "
                    "the queries of %d identity draws with no usable gallery image (see %s)",
                    summary["dropped_identities"], summary["dropped_draws"], rejected_file)
    return summary


def _cache_all(jobs: list[tuple[str, str]], root: Path, images: Path, size: int,
               workers: int) -> dict[str, str]:
    """Cache every image; source path -> why it was rejected, for the rejected ones."""
    work = partial(_cache_one, root=root, out_dir=images, size=size)
    progress = dict(total=len(jobs), desc="prepare: caching images", unit="img")
    if workers > 0 and len(jobs) > POOL_MIN_IMAGES:
        with Pool(workers) as pool:
            reasons = list(tqdm(pool.imap(work, jobs, chunksize=16), **progress))
    else:
        reasons = [work(job) for job in tqdm(jobs, **progress)]
    return {src: reason for (src, _), reason in zip(jobs, reasons, strict=True)
            if reason is not None}


def _manifest_row(rec: Record, target: dict[str, str]) -> tuple:
    row = asdict(rec)
    row["source_image"] = row.pop("path")
    row["image"] = f"images/{target[rec.path]}"
    return tuple(row[column] for column in MANIFEST_COLUMNS)


def _write_csv(path: Path, header: tuple[str, ...], rows: Iterable[tuple]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def _warn_upscaling(params: Params) -> None:
    """A cache smaller than the model's input is upscaled for every image it feeds: say so."""
    size = input_size(params.model.name)
    if size and params.data.cache_size < size:
        log.warning("data.cache_size is %d px but %s reads %d px images: every cached image is "
                    "upscaled for the model; set data.cache_size to %d or more",
                    params.data.cache_size, params.model.name, size, size)


DROPPED_ID = "identity dropped: no usable image left"
DROPPED_DRAW = "draw dropped"


def _drop_empty(owner: dict[str, str], records: list[Record], kept: list[Record]
                ) -> tuple[list[Record], list[tuple[str, str, str]], int]:
    """``data.drop_empty_identities``: the records left once the queries of every identity's draw
    whose gallery images were all rejected are dropped (no answer to find, so they would only be
    skipped in evaluation), one ``rejected.csv`` row per dropped identity (no image left at all)
    and per dropped query, and the number of identity draws dropped. A gallery without queries
    stays: it is a distractor, as the source gave it."""
    listed = {(rec.item_id, rec.split_index) for rec in records if rec.split == "gallery"}
    lost = listed - {(rec.item_id, rec.split_index) for rec in kept if rec.split == "gallery"}
    left, dropped = [], []
    for rec in kept:
        if rec.split == "query" and (rec.item_id, rec.split_index) in lost:
            dropped.append((rec.path, rec.item_id,
                            f"{DROPPED_DRAW} {rec.split_index}: the identity has no usable "
                            "gallery image in it (data.drop_empty_identities)"))
        else:
            left.append(rec)
    alive = {rec.item_id for rec in left}
    dropped += [("", item, f"{DROPPED_ID} (data.drop_empty_identities)")
                for item in sorted(set(owner.values()) - alive)]
    n_draws = len(lost)
    return left, dropped, n_draws


def _check_fraction(owner: dict[str, str], rejected: dict[str, str], max_fraction: float,
                    rejected_file: Path) -> None:
    fraction = len(rejected) / max(1, len(owner))
    if fraction > max_fraction:
        reasons: dict[str, int] = defaultdict(int)
        for reason in rejected.values():
            reasons[reason.split(":")[0]] += 1
        top = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:5])
        raise PrepareError(
            f"{len(rejected)} of {len(owner)} images rejected ({fraction:.1%}), more than "
            f"data.max_rejected_fraction={max_fraction:.1%}: {top}. See {rejected_file}.")


def _check_identities(owner: dict[str, str], kept: list[Record], rejected_file: Path) -> None:
    alive = {rec.item_id for rec in kept}
    lost = sorted({item for item in owner.values() if item not in alive})
    if lost:
        shown = ", ".join(lost[:10]) + (" ..." if len(lost) > 10 else "")
        raise PrepareError(f"{len(lost)} identit{'y' if len(lost) == 1 else 'ies'} left with no "
                           f"usable image: {shown}. See {rejected_file}; "
                           "data.drop_empty_identities: true drops them.")


def _summarise(kept: list[Record], n_rejected: int, n_excluded: int, source: str) -> dict:
    draws = sorted({rec.split_index for rec in kept if rec.split != "train"}) or [0]
    summary: dict = {"source": source}
    for split in SPLITS:
        # Counts of the first draw: every draw has the same identities and, per identity, the
        # same number of query and gallery images.
        rows = [r for r in kept if r.split == split and (split == "train" or
                                                         r.split_index == draws[0])]
        summary[split] = {"images": len(rows), "identities": len({r.item_id for r in rows})}
    summary["draws"] = len(draws)
    summary["rejected"] = n_rejected
    summary["excluded"] = n_excluded
    return summary
