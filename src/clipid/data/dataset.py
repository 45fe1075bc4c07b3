"""The prepared data set (``data/prepared``) as training and evaluation read it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from clipid.errors import ClipidError

__all__ = ["PreparedData", "ImageDataset"]


@dataclass
class PreparedData:
    """``manifest.csv`` and ``image_texts.json`` of a prepared data set."""

    root: Path
    table: pd.DataFrame            # one row per image and draw, all columns as strings
    texts: dict[str, str]          # prepared image path -> clean caption

    @classmethod
    def load(cls, root: str | Path, with_texts: bool = True) -> PreparedData:
        root = Path(root)
        manifest = root / "manifest.csv"
        if not manifest.is_file():
            raise ClipidError(f"{manifest}: not found; run the 'prepare' stage first")
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        table["split_index"] = table["split_index"].astype(int)
        table["camera"] = table["camera"].astype(int)
        texts: dict[str, str] = {}
        if with_texts:
            path = root / "image_texts.json"
            if not path.is_file():
                raise ClipidError(f"{path}: not found; run the 'clean_captions' stage first")
            texts = json.loads(path.read_text(encoding="utf-8"))
        return cls(root, table, texts)

    @property
    def draws(self) -> list[int]:
        """Monte-Carlo query/gallery draws (``[0]`` for a fixed split)."""
        return sorted(self.table.loc[self.table["split"] != "train", "split_index"].unique())

    def rows(self, split: str, draw: int = 0) -> pd.DataFrame:
        rows = self.table[self.table["split"] == split]
        if split != "train":
            rows = rows[rows["split_index"] == draw]
        return rows.reset_index(drop=True)

    def paths(self, rows: pd.DataFrame) -> list[Path]:
        return [self.root / p for p in rows["image"]]

    def captions(self, rows: pd.DataFrame) -> list[str]:
        missing = [p for p in rows["image"] if p not in self.texts]
        if missing:
            raise ClipidError(f"{self.root / 'image_texts.json'}: no caption for {missing[0]} "
                              f"(and {len(missing) - 1} more); rerun 'clean_captions'")
        return [self.texts[p] for p in rows["image"]]


class ImageDataset(Dataset):
    """Images from the prepared cache through a transform; yields ``(image, index)``."""

    def __init__(self, paths: list[Path], transform: Callable[[Image.Image], torch.Tensor]):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as im:
            return self.transform(im.convert("RGB")), index
