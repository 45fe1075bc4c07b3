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
from operator import attrgetter
from pathlib import Path

from tqdm import tqdm

from clipid.config import DataParams
from clipid.data.sources import SourceError, manifest_file

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
    # MSMT17_V1 (train/, test/) or V2 (faces blurred: mask_train_v2/, mask_test_v2/).
    "msmt17": SourceFiles(index=("list_train.txt", "list_val.txt", "list_query.txt",
                                 "list_gallery.txt"),
                          images=("train", "test", "mask_train_v2", "mask_test_v2")),
}


def source_files(params: DataParams) -> tuple[Path, SourceFiles]:
    """The data root folder of a real source and the files of it that ``prepare`` reads."""
    if params.source not in SOURCE_FILES:
        raise SourceError(f"data.source '{params.source}' declares no files for the fingerprint: "
                          "add it to clipid.data.fingerprint.SOURCE_FILES")
    files = SOURCE_FILES[params.source]
    root = Path(params.root).expanduser()
    if params.source == "manifest" and params.root:
        manifest = manifest_file(root)
        root, files = manifest.parent, replace(files, index=(manifest.name,))
    if not params.root or not root.is_dir():
        raise SourceError(f"data.root: '{params.root}' is not a directory; data.source "
                          f"'{params.source}' needs the data set's root folder")
    return root, files


class _Listing:
    """Lines ``path NUL size NUL mtime_ns`` in a fixed order (sorted names, folder by folder),
    and the bytes of the files they list."""

    def __init__(self, skip: frozenset[str]) -> None:
        self.lines: list[str] = []
        self.bytes = 0
        self.skip = skip  # root-relative paths left out (the index files)


def _list_folder(folder: str, prefix: str, ancestors: tuple, listing: _Listing) -> None:
    """Lists every file under ``folder``. Symbolic links are followed, as ``prepare`` follows
    them, except back into a folder being listed. Per file: one ``stat``, no other work."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=attrgetter("name"))
    except OSError as exc:
        raise SourceError(f"{folder}: cannot list: {exc.strerror}") from exc
    lines, total = listing.lines, 0
    for entry in entries:
        if entry.name.startswith("."):
            continue
        rel = prefix + entry.name
        try:
            info = entry.stat()
        except OSError:  # a broken link: prepare rejects it as missing, the listing says so
            lines.append(f"{rel}\0-1\0-1")
            continue
        if stat.S_ISDIR(info.st_mode):
            key = (info.st_dev, info.st_ino)
            if key not in ancestors:
                _list_folder(entry.path, rel + "/", ancestors + (key,), listing)
        elif rel not in listing.skip:
            lines.append(f"{rel}\0{info.st_size}\0{info.st_mtime_ns}")
            total += info.st_size
    listing.bytes += total


def listing_digest(root: Path, folders: tuple[str, ...], skip: frozenset[str] = frozenset()
                   ) -> dict:
    """Files, bytes and the sha256 of the ``path, size, mtime`` listing of ``folders`` under
    ``root`` (``skip``: root-relative paths left out). Order on disk never matters."""
    listing = _Listing(skip)
    with tqdm(desc="fingerprint: listing images", unit="file", leave=False) as progress:
        for folder in sorted(set(folders)):
            path = root / folder
            if not path.is_dir():
                continue  # a missing folder is as empty as an empty one for prepare
            prefix = "" if folder in ("", ".") else Path(folder).as_posix().rstrip("/") + "/"
            top, before = path.stat(), len(listing.lines)
            _list_folder(str(path), prefix, ((top.st_dev, top.st_ino),), listing)
            progress.update(len(listing.lines) - before)
    # NUL never occurs in a file name, nor a newline in the numbers: one text, one listing.
    text = "\n".join(listing.lines).encode("utf-8", "surrogateescape")
    return {"files": len(listing.lines), "bytes": listing.bytes,
            "listing_sha256": hashlib.sha256(text).hexdigest()}


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
