"""A searchable gallery: the embeddings of the gallery images under one model, the images'
paths and identities, and the nearest-neighbour index over them.

On disk (``models/index/<model>/``, written by the ``index`` stage):
``embeddings.npy`` (float32, one unit row per image), ``gallery.csv`` (image, item_id),
``index.json`` (model, checkpoint, backend, ...) and ``faiss.index`` for the faiss backend.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from clipid.config import EvalParams, FaissParams
from clipid.data.dataset import PreparedData
from clipid.errors import ClipidError
from clipid.features import image_features
from clipid.models.factory import ClipModel
from clipid.models.visual import text_space
from clipid.runtime import resolve_precision
from clipid.search.index import ExactIndex, FaissIndex, SearchIndex, build_index, load_index

log = logging.getLogger(__name__)

__all__ = ["GalleryIndex", "Hit", "gallery_rows", "model_fingerprint"]

FORMAT_VERSION = 1


@dataclass
class Hit:
    rank: int
    score: float
    item_id: str
    image: str       # path as the user can open it (prepared root joined)


def model_fingerprint(clip: ClipModel) -> str:
    """Identifies the weights behind an index: a retrained stage has a new sidecar (run id,
    losses, time), a pretrained model its tag or file."""
    text = json.dumps(clip.metadata, sort_keys=True, default=str) if clip.metadata \
        else f"{clip.architecture}:{clip.weights}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def gallery_rows(data: PreparedData) -> pd.DataFrame:
    """Every image that is in the gallery of some evaluation draw, once: with Monte-Carlo
    query/gallery draws (11k Hands) the searchable gallery is their union."""
    rows = data.table[data.table["split"] == "gallery"]
    if rows.empty:
        raise ClipidError(f"{data.root / 'manifest.csv'}: no gallery images to index")
    return rows.drop_duplicates("image")[["image", "item_id"]].reset_index(drop=True)


@dataclass
class GalleryIndex:
    model: str                     # the stage whose model embedded the gallery
    root: Path                     # the prepared data root the image paths are relative to
    table: pd.DataFrame            # image, item_id: one row per embedding
    embeddings: np.ndarray         # (N, D) float32 unit vectors
    index: SearchIndex            # exact or faiss, by search.backend
    info: dict[str, Any]

    @classmethod
    def build(cls, clip: ClipModel, model: str, data: PreparedData, eval_params: EvalParams,
              backend: str, faiss_params: FaissParams, device: Any = "cpu",
              seed: int = 0) -> GalleryIndex | None:
        """Embeds the gallery; in a process group every rank embeds a share and rank 0 builds
        the index (the other ranks get ``None``)."""
        table = gallery_rows(data)
        features = image_features(
            clip.model, data.paths(table), clip.preprocess_val, batch_size=eval_params.batch_size,
            workers=eval_params.workers, flip=eval_params.flip, device=device,
            dtype=resolve_precision(eval_params.precision, torch.device(device), "eval.precision"),
            desc=f"index {model}", shard=True)
        if features is None:
            return None
        embeddings = features.numpy().astype(np.float32)
        index = build_index(embeddings, backend, faiss_params, seed=seed)
        info = {"format": FORMAT_VERSION, "model": model, "architecture": clip.architecture,
                "weights": clip.weights, "model_fingerprint": model_fingerprint(clip),
                "backend": backend, "images": len(table),
                "dim": int(embeddings.shape[1]), "flip": eval_params.flip,
                "prepared": str(data.root)}
        if backend == "faiss":
            info["faiss"] = asdict(faiss_params)
        return cls(model, data.root, table, embeddings, index, info)

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "embeddings.npy", self.embeddings)
        self.table.to_csv(directory / "gallery.csv", index=False)
        if isinstance(self.index, FaissIndex):
            self.index.save(directory / "faiss.index")
        (directory / "index.json").write_text(json.dumps(self.info, indent=2) + "\n",
                                              encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: Path) -> GalleryIndex:
        meta = directory / "index.json"
        if not meta.is_file():
            raise ClipidError(f"{meta}: no gallery index here; run `dvc repro index` (or "
                              "`clipid index`) first")
        info = json.loads(meta.read_text(encoding="utf-8"))
        if info.get("format") != FORMAT_VERSION:
            raise ClipidError(f"{meta}: index format {info.get('format')}, this clipid reads "
                              f"{FORMAT_VERSION}; rerun the 'index' stage")
        embeddings = np.load(directory / "embeddings.npy")
        table = pd.read_csv(directory / "gallery.csv", dtype=str, keep_default_na=False)
        if len(table) != len(embeddings):
            raise ClipidError(f"{directory}: {len(table)} gallery rows but {len(embeddings)} "
                              "embeddings; rerun the 'index' stage")
        faiss_params = FaissParams(**info["faiss"]) if "faiss" in info else None
        index = load_index(embeddings, info["backend"], directory / "faiss.index", faiss_params)
        return cls(info["model"], Path(info["prepared"]), table, embeddings, index, info)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Ranked hits of each query embedding, best first. Text queries of a ``concat``
        gallery (narrower than its embeddings) are ranked exactly against its projected part."""
        index = self.index
        if queries.shape[1] < self.embeddings.shape[1]:
            index = ExactIndex(text_space(self.embeddings, queries.shape[1]))
        scores, ids = index.search(queries, k)
        images, items = self.table["image"].to_numpy(), self.table["item_id"].to_numpy()
        out = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            valid = row_ids >= 0   # faiss pads with -1 when fewer than k are reachable
            out.append([Hit(rank + 1, float(s), str(items[i]), str(self.root / images[i]))
                        for rank, (s, i) in enumerate(zip(row_scores[valid], row_ids[valid],
                                                          strict=True))])
        return out
