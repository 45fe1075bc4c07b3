"""Source adapters: each reads one data set's own index format into a list of :class:`Record`.

Adapters only read indexes; images are opened (and possibly rejected) later by ``prepare``. An
index that cannot be parsed is a :class:`SourceError` naming the file and line. Each source also
declares the files it reads in :data:`clipid.data.fingerprint.SOURCE_FILES`.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from clipid.config import DataParams
from clipid.errors import ClipidError

__all__ = ["Record", "SourceError", "SPLITS", "manifest_file", "read_source", "read_inshop",
           "read_hands11k", "read_manifest"]

SPLITS = ("train", "query", "gallery")


class SourceError(ClipidError, ValueError):
    """A data set index that clipid cannot read."""


@dataclass(frozen=True)
class Record:
    """One image's role in one query/gallery draw."""

    path: str              # the image path as the index writes it, relative to the data root
    item_id: str           # identity, always a string (leading zeros kept)
    split: str             # train | query | gallery
    split_index: int = 0   # Monte-Carlo draw the row belongs to (0 where there is only one)
    camera: int = -1       # -1: unknown, so no same-camera filtering in evaluation
    caption: str = ""      # raw caption as the source gives it
    attributes: str = ""   # known attributes in words: fills empty captions
    excluded: str = ""     # why the data set's protocol leaves the image out ("": it is used)


def read_source(params: DataParams, workdir: Path) -> tuple[Path, list[Record]]:
    """Dispatch on ``data.source``: the data root and its records.

    ``workdir`` is scratch space: the synthetic source draws its images there.
    """
    if params.source == "synthetic":
        from clipid.data.synthetic import generate  # Pillow drawing code, only needed here

        manifest = generate(workdir / "synthetic", params.synthetic, seed=params.seed,
                            workers=params.workers)
        return manifest.parent, read_manifest(manifest)
    root = Path(params.root).expanduser()
    if params.source == "manifest" and params.root:
        manifest = manifest_file(root)
        return manifest.parent, read_manifest(manifest)
    if not params.root or not root.is_dir():
        raise SourceError(f"data.root: '{params.root}' is not a directory; data.source "
                          f"'{params.source}' needs the data set's root folder")
    if params.source == "inshop":
        return root, read_inshop(root)
    if params.source == "hands11k":
        return root, read_hands11k(root, params.hands11k.aspect,
                                   params.hands11k.exclude_accessories, params.splits, params.seed)
    if params.source in ("market1501", "dukemtmc", "msmt17"):
        from clipid.data.person import read_market_layout, read_msmt17

        if params.source == "msmt17":
            return root, read_msmt17(root)
        return root, read_market_layout(root, params.source)
    raise SourceError(f"data.root is empty; data.source '{params.source}' needs it")


def manifest_file(root: Path) -> Path:
    """``data.root`` of the manifest source: the CSV itself (a file, or a name ending in .csv)
    or the folder holding ``manifest.csv``. ``fingerprint`` and ``prepare`` both read it here."""
    return root if root.is_file() or root.suffix.lower() == ".csv" else root / "manifest.csv"


# ---------------------------------------------------------------------------------------------
# DeepFashion In-shop

def _inshop_descriptions(path: Path) -> dict[str, tuple[str, str]]:
    """item id -> (colour, description) from ``list_description_inshop.json`` (either a list of
    ``{"item", "color", "description"}`` objects or a mapping keyed by item id)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
    entries = data.items() if isinstance(data, dict) else ((e.get("item"), e) for e in data)
    out: dict[str, tuple[str, str]] = {}
    for item, entry in entries:
        if not isinstance(entry, dict) or not item:
            continue
        desc = entry.get("description", "")
        if isinstance(desc, list):
            desc = " ".join(str(d) for d in desc)
        out[str(item).strip()] = (str(entry.get("color", "") or ""), str(desc))
    return out


def read_inshop(root: Path) -> list[Record]:
    """DeepFashion In-shop: ``Eval/list_eval_partition.txt`` (line 1 the image count, line 2 the
    header, then ``image_name item_id evaluation_status``), images under ``img/``."""
    index = root / "Eval" / "list_eval_partition.txt"
    if not index.is_file():
        raise SourceError(f"{index}: not found (DeepFashion In-shop needs Eval/"
                          "list_eval_partition.txt under data.root)")
    lines = index.read_text(encoding="utf-8").splitlines()
    if len(lines) < 2:
        raise SourceError(f"{index}: expected the image count and a header, got {len(lines)} lines")
    try:
        expected = int(lines[0].strip())
    except ValueError:
        raise SourceError(f"{index}:1: expected the number of images, got {lines[0]!r}") from None
    header = lines[1].split()
    if header != ["image_name", "item_id", "evaluation_status"]:
        raise SourceError(f"{index}:2: expected header 'image_name item_id evaluation_status', "
                          f"got {lines[1]!r}")
    descriptions_file = root / "list_description_inshop.json"
    if not descriptions_file.is_file():
        descriptions_file = root / "Anno" / "list_description_inshop.json"
    descriptions = _inshop_descriptions(descriptions_file) if descriptions_file.is_file() else {}

    records: list[Record] = []
    for lineno, line in enumerate(lines[2:], start=3):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3:
            raise SourceError(f"{index}:{lineno}: expected 3 fields, got {len(fields)}: {line!r}")
        image, item_id, status = fields
        if status not in SPLITS:
            raise SourceError(f"{index}:{lineno}: evaluation_status {status!r} is not one of "
                              f"{', '.join(SPLITS)}")
        colour, description = descriptions.get(item_id, ("", ""))
        records.append(Record(path=image, item_id=item_id, split=status, caption=description,
                              attributes=_inshop_attributes(image, colour)))
    if len(records) != expected:
        raise SourceError(f"{index}:1: announces {expected} images but lists {len(records)}")
    return records


def _inshop_attributes(image: str, colour: str) -> str:
    """``img/WOMEN/Blouses_Shirts/id_.../01_1_front.jpg`` -> 'white women's blouses shirts'."""
    parts = Path(image).parts
    words = []
    if len(parts) >= 4:
        gender, category = parts[-4], parts[-3]
        words = [f"{gender.lower()}'s", re.sub(r"[_\-]+", " ", category).lower()]
    return " ".join(w for w in [colour.lower().strip(), *words] if w)


# ---------------------------------------------------------------------------------------------
# 11k Hands

_ASPECTS = {"dorsal_r": "dorsal right", "dorsal_l": "dorsal left",
            "palmar_r": "palmar right", "palmar_l": "palmar left"}
_HANDS_COLUMNS = ("id", "age", "gender", "skinColor", "accessories", "nailPolish",
                  "aspectOfHand", "imageName", "irregularities")


def _hands_caption(row: dict[str, str]) -> str:
    view, side = row["aspectOfHand"].split()
    person = {"male": "man", "female": "woman"}.get(row["gender"].strip().lower(), "person")
    skin = row["skinColor"].strip().lower()
    caption = f"a {view} view of the {side} hand of a {row['age'].strip()} year old {person}"
    caption += f" with {skin} skin" if skin else ""
    if row["nailPolish"].strip() == "1":
        caption += " and painted nails"
    return caption


def read_hands11k(root: Path, aspect: str, exclude_accessories: bool, splits: int,
                  seed: int) -> list[Record]:
    """11k Hands, with the protocol of the MBA-Net papers.

    Subjects are split by sorted id: the first half trains, the rest is test. For the test
    subjects, ``splits`` random draws each put one random image per subject in the gallery and the
    others in the query set (``split_index`` numbers the draws).
    """
    index = root / "HandInfo.csv"
    if not index.is_file():
        raise SourceError(f"{index}: not found (11k Hands needs HandInfo.csv under data.root)")
    wanted = _ASPECTS[aspect]
    by_subject: dict[str, list[tuple[str, str]]] = {}
    with index.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in _HANDS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SourceError(f"{index}:1: missing column(s) {', '.join(missing)}")
        for lineno, row in enumerate(reader, start=2):
            hand = " ".join(row["aspectOfHand"].split()).lower()
            if hand not in _ASPECTS.values():
                raise SourceError(f"{index}:{lineno}: aspectOfHand {row['aspectOfHand']!r} is not "
                                  f"one of {', '.join(_ASPECTS.values())}")
            row["aspectOfHand"] = hand
            if hand != wanted:
                continue
            if exclude_accessories and row["accessories"].strip() not in ("0", ""):
                continue
            subject = row["id"].strip()  # ids are strings: keep leading zeros, drop stray spaces
            if not subject:
                raise SourceError(f"{index}:{lineno}: empty id")
            by_subject.setdefault(subject, []).append(
                (f"Hands/{row['imageName'].strip()}", _hands_caption(row)))
    if len(by_subject) < 2:
        raise SourceError(f"{index}: {len(by_subject)} subject(s) with '{wanted}' images; need at "
                          "least 2 to split train and test")

    subjects = sorted(by_subject, key=lambda s: (int(s), s) if s.isdigit() else (float("inf"), s))
    n_train = len(subjects) // 2
    records = [Record(path=p, item_id=s, split="train", caption=c, attributes=c)
               for s in subjects[:n_train] for p, c in sorted(by_subject[s])]
    rng = random.Random(seed)
    for draw in range(splits):
        for subject in subjects[n_train:]:
            images = sorted(by_subject[subject])
            gallery = rng.randrange(len(images))
            for i, (path, caption) in enumerate(images):
                records.append(Record(path=path, item_id=subject, split_index=draw,
                                      split="gallery" if i == gallery else "query",
                                      caption=caption, attributes=caption))
    return records


# ---------------------------------------------------------------------------------------------
# Any CSV manifest

def read_manifest(path: Path) -> list[Record]:
    """A CSV with columns ``image,item_id,split`` and optional ``camera``, ``caption``,
    ``attributes``; ``image`` is relative to the CSV's folder."""
    if not path.is_file():
        raise SourceError(f"{path}: manifest not found")
    records = []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        missing = [c for c in ("image", "item_id", "split") if c not in columns]
        if missing:
            raise SourceError(f"{path}:1: missing column(s) {', '.join(missing)} (have: "
                              f"{', '.join(columns)})")
        for lineno, row in enumerate(reader, start=2):
            image, item_id = (row["image"] or "").strip(), (row["item_id"] or "").strip()
            split = (row["split"] or "").strip().lower()
            if not image or not item_id:
                raise SourceError(f"{path}:{lineno}: empty image or item_id")
            if split not in SPLITS:
                raise SourceError(f"{path}:{lineno}: split {row['split']!r} is not one of "
                                  f"{', '.join(SPLITS)}")
            camera = (row.get("camera") or "").strip()
            try:
                camera_id = int(camera) if camera else -1
            except ValueError:
                raise SourceError(f"{path}:{lineno}: camera {camera!r} is not an integer") from None
            records.append(Record(path=image, item_id=item_id, split=split, camera=camera_id,
                                  caption=row.get("caption") or "",
                                  attributes=(row.get("attributes") or "").strip()))
    if not records:
        raise SourceError(f"{path}: no rows")
    return records
