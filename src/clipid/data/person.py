"""Person re-identification data sets, read with the protocol of torchreid and CLIP-ReID.

- Market-1501 and DukeMTMC-reID: ``bounding_box_train/`` (train), ``query/`` and
  ``bounding_box_test/`` (gallery); identity and camera come from the file name
  (``0002_c1s1_000451_03.jpg``: person 0002, camera 1). Identity -1 (Market-1501's junk boxes) is
  left out and recorded as excluded; identity 0000 (distractors) stays in the gallery.
- MSMT17: ``list_train.txt``, ``list_val.txt``, ``list_query.txt``, ``list_gallery.txt`` (lines
  ``path pid``, paths relative to ``train/`` or ``test/``); the camera is the third ``_`` field of
  the file name. Train and val together are the training set, as in CLIP-ReID.

Cameras keep the data set's own numbers (1-based; torchreid subtracts 1, which changes nothing:
evaluation only compares cameras for equality). Records come sorted by split and path, so neither
the order of files on disk nor that of list lines changes anything downstream.
"""

from __future__ import annotations

import re
from pathlib import Path

from clipid.data.sources import SPLITS, Record, SourceError

__all__ = ["PERSON_SOURCES", "read_market_layout", "read_msmt17"]

# data.source -> (data set name, number of cameras)
PERSON_SOURCES = {"market1501": ("Market-1501", 6), "dukemtmc": ("DukeMTMC-reID", 8),
                  "msmt17": ("MSMT17", 15)}

# The file-name pattern of torchreid and CLIP-ReID: person id (possibly -1), '_c', camera digit.
_MARKET_NAME = re.compile(r"([-\d]+)_c(\d)", re.ASCII)
_MARKET_FOLDERS = (("bounding_box_train", "train"), ("query", "query"),
                   ("bounding_box_test", "gallery"))
JUNK_IDENTITY = -1

# list file -> (image folder role, split); val joins train (CLIP-ReID's msmt17.py does the same).
_MSMT_LISTS = (("list_train.txt", "train", "train"), ("list_val.txt", "train", "train"),
               ("list_query.txt", "test", "query"), ("list_gallery.txt", "test", "gallery"))
# Image folders of MSMT17_V1 and of MSMT17_V2 (faces blurred), as torchreid knows them.
_MSMT_FOLDERS = (("train", "test"), ("mask_train_v2", "mask_test_v2"))


def _sorted(records: list[Record]) -> list[Record]:
    return sorted(records, key=lambda r: (SPLITS.index(r.split), r.path))


def _camera(value: str, cameras: int, where: str, dataset: str) -> int:
    camera = int(value)
    if not 1 <= camera <= cameras:
        raise SourceError(f"{where}: camera {camera} is not in 1..{cameras} of {dataset}")
    return camera


def _market_record(path: Path, root: Path, split: str, dataset: str, cameras: int) -> Record:
    match = _MARKET_NAME.match(path.name)
    if match is None or not re.fullmatch(r"-1|[0-9]+", match.group(1)):
        raise SourceError(f"{path}: the file name does not start with '<person>_c<camera>' "
                          f"({dataset} names its images like 0002_c1s1_000451_03.jpg, junk "
                          "boxes -1_c1s1_000401_03.jpg)")
    pid = int(match.group(1))
    camera = _camera(match.group(2), cameras, str(path), dataset)
    relative = path.relative_to(root).as_posix()
    if pid == JUNK_IDENTITY:
        return Record(path=relative, item_id=str(pid), split=split, camera=camera,
                      excluded=f"junk image (identity -1), left out by the {dataset} protocol")
    # '2_c1...' and '0002_c1...' are the same person: one spelling of the identity.
    return Record(path=relative, item_id=f"{pid:04d}", split=split, camera=camera)


def read_market_layout(root: Path, source: str = "market1501") -> list[Record]:
    """Market-1501 or DukeMTMC-reID (``source``): the ``*.jpg`` files of the three folders."""
    dataset, cameras = PERSON_SOURCES[source]
    missing = [folder for folder, _ in _MARKET_FOLDERS if not (root / folder).is_dir()]
    if missing:
        raise SourceError(f"{root}: no {', '.join(f'{m}/' for m in missing)} folder; {dataset} "
                          "needs bounding_box_train/, query/ and bounding_box_test/ under "
                          "data.root")
    records = [_market_record(path, root, split, dataset, cameras)
               for folder, split in _MARKET_FOLDERS
               for path in sorted((root / folder).glob("*.jpg"))]
    if not any(r.split == "train" and not r.excluded for r in records):
        raise SourceError(f"{root / 'bounding_box_train'}: no usable .jpg image")
    return _sorted(records)


def _msmt_folders(root: Path) -> tuple[str, str]:
    for train, test in _MSMT_FOLDERS:
        if (root / train).is_dir() and (root / test).is_dir():
            return train, test
    options = " or ".join(f"{a}/ and {b}/" for a, b in _MSMT_FOLDERS)
    raise SourceError(f"{root}: MSMT17 needs the image folders {options} under data.root")


def _msmt_line(line: str, where: str, cameras: int) -> tuple[str, int, int]:
    """``0000/0000_000_01_0303morning_0015_0.jpg 0`` -> (path, pid 0, camera 1)."""
    fields = line.split()
    if len(fields) != 2:
        raise SourceError(f"{where}: expected 'path pid', got {line.strip()!r}")
    path, pid_text = fields
    if not re.fullmatch(r"[0-9]+", pid_text):
        raise SourceError(f"{where}: pid {pid_text!r} is not a non-negative integer")
    name_fields = Path(path).name.split("_")
    if len(name_fields) < 3 or not re.fullmatch(r"[0-9]+", name_fields[2]):
        raise SourceError(f"{where}: the camera (third '_' field of the file name) of {path!r} "
                          "is not a number")
    return path, int(pid_text), _camera(name_fields[2], cameras, where, "MSMT17")


def read_msmt17(root: Path) -> list[Record]:
    """MSMT17 (V1 ``train/``+``test/`` or V2 ``mask_train_v2/``+``mask_test_v2/``).

    Identities are ``train/0000`` and ``test/0000``: MSMT17 numbers the training and the test
    persons from 0 each, so a bare pid would merge two different people.
    """
    _, cameras = PERSON_SOURCES["msmt17"]
    missing = [name for name, _, _ in _MSMT_LISTS if not (root / name).is_file()]
    if missing:
        raise SourceError(f"{root}: {', '.join(missing)} not found; MSMT17 needs "
                          f"{', '.join(name for name, _, _ in _MSMT_LISTS)} under data.root")
    folders = dict(zip(("train", "test"), _msmt_folders(root), strict=True))
    records: list[Record] = []
    listed_at: dict[str, str] = {}
    for name, role, split in _MSMT_LISTS:
        index = root / name
        for lineno, line in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{index}:{lineno}"
            path, pid, camera = _msmt_line(line, where, cameras)
            image = f"{folders[role]}/{path}"
            if image in listed_at:
                raise SourceError(f"{where}: {path} is already listed at {listed_at[image]}")
            listed_at[image] = where
            records.append(Record(path=image, item_id=f"{role}/{pid:04d}", split=split,
                                  camera=camera))
    if not any(r.split == "train" for r in records):
        raise SourceError(f"{root / 'list_train.txt'}: lists no image (nor does list_val.txt)")
    return _sorted(records)
