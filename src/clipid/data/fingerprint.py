"""A cheap fingerprint of what ``prepare`` reads under ``data.root``, so DVC notices changes.

A real data set lives outside the repository, where DVC cannot see it. The ``fingerprint`` stage
(``always_changed``) rewrites ``data/fingerprint.json`` on every ``dvc repro`` and ``prepare``
depends on that file: prepare reruns exactly when the fingerprint's bytes change.

- Index files (partition lists, ``HandInfo.csv``, a manifest CSV) are small and edited by hand:
  their content is hashed (sha256), so a fixed caption is seen even with the same size and mtime.
- Images are too many to hash on every run: each file's root-relative path, size and modification
  time (ns) make a sorted listing, and the listing is hashed. Adding, removing or replacing an image
  changes it; reading does not.

Only root-relative names are written, never the absolute root: ``data.root`` itself is a ``data``
param of ``prepare``, so pointing it at another copy reruns prepare anyway. Modification times are
those of this machine's copy: another clone's copy of the same data has its own fingerprint, and
prepare reruns there once. Names starting with ``.`` (``.DS_Store``, ``.git``, ...) are not listed.
The synthetic source has no root: its fingerprint is a constant and nothing is walked.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from clipid.config import DataParams
from clipid.data.sources import SourceError

__all__ = ["SourceFiles", "SOURCE_FILES", "source_files", "listing_digest", "fingerprint",
           "fingerprint_json"]


@dataclass(frozen=True)
class SourceFiles:
    """What ``prepare`` reads of one source, as paths relative to its data root."""

    index: tuple[str, ...] = ()   # small index files: content hashed; an absent one is recorded
    images: tuple[str, ...] = ()  # folders listed recursively: path, size and mtime of each file


# Every real source declares here the files its reader and ``prepare`` open (tests check that a
# prepare run opens nothing else). A new source adds its entry next to its reader.
SOURCE_FILES: dict[str, SourceFiles] = {
    "inshop": SourceFiles(index=("Eval/list_eval_partition.txt", "list_description_inshop.json",
                                 "Anno/list_description_inshop.json"), images=("img",)),
    "hands11k": SourceFiles(index=("HandInfo.csv",), images=("Hands",)),
    # data.root is the CSV or its folder; images are anywhere under the CSV's folder.
    "manifest": SourceFiles(index=("manifest.csv",), images=(".",)),
    "market1501": SourceFiles(images=("bounding_box_train", "query", "bounding_box_test")),
    "dukemtmc": SourceFiles(images=("bounding_box_train", "query", "bounding_box_test")),
    "msmt17": SourceFiles(index=("list_train.txt", "list_val.txt", "list_query.txt",
                                 "list_gallery.txt"), images=("train", "test")),
}


def source_files(params: DataParams) -> tuple[Path, SourceFiles]:
    """The data root folder of a real source and the files of it that ``prepare`` reads."""
    if params.source not in SOURCE_FILES:
        raise SourceError(f"data.source '{params.source}' declares no files for the fingerprint: "
                          "add it to clipid.data.fingerprint.SOURCE_FILES")
    files = SOURCE_FILES[params.source]
    root = Path(params.root).expanduser()
    if params.source == "manifest" and root.suffix == ".csv":
        root, files = root.parent, replace(files, index=(root.name,))
    if not params.root or not root.is_dir():
        raise SourceError(f"data.root: '{params.root}' is not a directory; data.source "
                          f"'{params.source}' needs the data set's root folder")
    return root, files


def _list_folder(folder: str, prefix: str, skip: frozenset[str], ancestors: tuple,
                 out: list[tuple[str, int, int]]) -> int:
    """Appends ``(root-relative path, size, mtime_ns)`` of every file under ``folder``; returns the
    number of files. Symbolic links are followed, as ``prepare`` follows them, except back into a
    folder being listed."""
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as exc:
        raise SourceError(f"{folder}: cannot list: {exc.strerror}") from exc
    count = 0
    for entry in entries:
        if entry.name.startswith("."):
            continue
        rel = prefix + entry.name
        try:
            info = entry.stat()
        except OSError:  # a broken link: prepare rejects it as missing, the listing says so
            out.append((rel, -1, -1))
            count += 1
            continue
        if stat.S_ISDIR(info.st_mode):
            key = (info.st_dev, info.st_ino)
            if key not in ancestors:
                count += _list_folder(entry.path, rel + "/", skip, ancestors + (key,), out)
        elif rel not in skip:
            out.append((rel, info.st_size, info.st_mtime_ns))
            count += 1
    return count


def listing_digest(root: Path, folders: tuple[str, ...], skip: frozenset[str] = frozenset()
                   ) -> dict:
    """Files, bytes and the sha256 of the sorted ``path, size, mtime`` listing of ``folders``
    under ``root`` (``skip``: root-relative paths left out). Order on disk never matters."""
    listing: list[tuple[str, int, int]] = []
    with tqdm(desc="fingerprint: listing images", unit="file", leave=False) as progress:
        for folder in sorted(set(folders)):
            path = root / folder
            if not path.is_dir():
                continue  # a missing folder is as empty as an empty one for prepare
            prefix = "" if folder in ("", ".") else Path(folder).as_posix().rstrip("/") + "/"
            top = path.stat()
            progress.update(_list_folder(str(path), prefix, skip, ((top.st_dev, top.st_ino),),
                                         listing))
    listing.sort()
    digest = hashlib.sha256()
    for rel, size, mtime in listing:
        # NUL never occurs in a file name: no two listings hash the same bytes.
        digest.update(b"%s\0%d\0%d\n" % (os.fsencode(rel), size, mtime))
    return {"files": len(listing), "bytes": sum(max(size, 0) for _, size, _ in listing),
            "listing_sha256": digest.hexdigest()}


def _index_digests(root: Path, index: tuple[str, ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in sorted(set(index)):
        path = root / name
        if not path.is_file():
            out[name] = None  # absent now; its appearance later changes the fingerprint
            continue
        with path.open("rb") as fh:
            out[name] = hashlib.file_digest(fh, "sha256").hexdigest()
    return out


def fingerprint(params: DataParams) -> dict:
    """The fingerprint of the data ``prepare`` reads with these params (see the module doc)."""
    if params.source == "synthetic":
        return {"source": "synthetic"}  # drawn from data.synthetic params, which prepare reads
    root, files = source_files(params)
    return {"source": params.source, "index": _index_digests(root, files.index),
            "images": listing_digest(root, files.images, frozenset(files.index))}


def fingerprint_json(params: DataParams) -> str:
    """The fingerprint as the stable text ``data/fingerprint.json`` holds."""
    return json.dumps(fingerprint(params), indent=2, sort_keys=True) + "\n"
