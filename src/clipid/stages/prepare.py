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
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a rerun must not keep images of an earlier source
    out_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="clipid-") as scratch:
        root, listed = read_source(data, Path(scratch))
        excluded = [rec for rec in listed if rec.excluded]
        records = [rec for rec in listed if not rec.excluded]
        owner = _unique_images(records)
        jobs = [(src, cached_name(src, data.cache_format)) for src in owner]
        work = partial(_cache_one, root=root, out_dir=workspace.images, size=data.cache_size)
        progress = dict(total=len(jobs), desc="prepare: caching images", unit="img")
        if data.workers > 0 and len(jobs) > POOL_MIN_IMAGES:
            with Pool(data.workers) as pool:
                reasons = list(tqdm(pool.imap(work, jobs, chunksize=16), **progress))
        else:
            reasons = [work(job) for job in tqdm(jobs, **progress)]

    rejected = {src: reason for (src, _), reason in zip(jobs, reasons, strict=True)
                if reason is not None}
    target = dict(jobs)
    with rejected_file.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source_image", "item_id", "reason"])
        for rec in excluded:
            writer.writerow([rec.path, rec.item_id, rec.excluded])
        for src, reason in rejected.items():
            writer.writerow([src, owner[src], reason])

    kept = [rec for rec in records if rec.path not in rejected]
    _check_usable(owner, rejected, kept, data.max_rejected_fraction, rejected_file)

    with workspace.manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for rec in kept:
            row = asdict(rec)
            row["source_image"] = row.pop("path")
            del row["excluded"]
            row["image"] = f"images/{target[rec.path]}"
            writer.writerow(row)

    summary = _summarise(kept, len(rejected), len(excluded), data.source)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info("prepared %d images (%d rejected, %d excluded) into %s",
             len(owner) - len(rejected), len(rejected), len(excluded), out_dir)
    return summary


def _check_usable(owner: dict[str, str], rejected: dict[str, str], kept: list[Record],
                  max_fraction: float, rejected_file: Path) -> None:
    fraction = len(rejected) / max(1, len(owner))
    if fraction > max_fraction:
        reasons: dict[str, int] = defaultdict(int)
        for reason in rejected.values():
            reasons[reason.split(":")[0]] += 1
        top = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:5])
        raise PrepareError(
            f"{len(rejected)} of {len(owner)} images rejected ({fraction:.1%}), more than "
            f"data.max_rejected_fraction={max_fraction:.1%}: {top}. See {rejected_file}.")
    alive = {rec.item_id for rec in kept}
    lost = sorted({item for item in owner.values() if item not in alive})
    if lost:
        shown = ", ".join(lost[:10]) + (" ..." if len(lost) > 10 else "")
        raise PrepareError(f"{len(lost)} identit{'y' if len(lost) == 1 else 'ies'} left with no "
                           f"usable image: {shown}. See {rejected_file}.")


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
