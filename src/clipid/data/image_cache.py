"""The prepared images decoded once: uint8 ``(N, 3, size, size)`` at the training resolution in
a memory-mapped ``.npy`` under ``.clipid/image-cache/`` (``train.image_cache``).

Built lazily by the first training stage that needs it, not by ``prepare``: it depends on the
model's input size as well as on the data, and it is a local speed-up, not a pipeline output.
Its name carries a key of everything its bytes depend on (the ``data`` params, the manifest's
hash, the image list, the size), so a change of any of them builds a new cache and deletes
the stale one; no stale pixels are ever read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from clipid.config import DataParams
from clipid.models.checkpoint import file_sha256

log = logging.getLogger(__name__)

__all__ = ["cache_key", "ensure_image_cache", "open_image_cache"]

FORMAT = 1


def cache_key(data: DataParams, manifest: Path, images: list[str], size: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": FORMAT, "size": size, "data": dataclasses.asdict(data)},
                             sort_keys=True).encode())
    digest.update(file_sha256(manifest).encode())
    digest.update("\n".join(images).encode())
    return digest.hexdigest()[:20]


def ensure_image_cache(purpose: str, key: str, paths: list[Path], size: int,
                       decode: Callable[[Image.Image], torch.Tensor],
                       cache_dir: Path) -> Path:
    """``cache_dir/<purpose>-<key>.npy``, decoding every image with ``decode`` (PIL -> uint8
    ``(3, size, size)``) when it does not exist yet; other keys of ``purpose`` are deleted."""
    path = cache_dir / f"{purpose}-{key}.npy"
    for stale in cache_dir.glob(f"{purpose}-*.npy"):
        if stale != path:
            log.info("image cache: removing stale %s", stale)
            stale.unlink()
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}.npy")
    array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8,
                                      shape=(len(paths), 3, size, size))
    for i, image in enumerate(tqdm(paths, desc=f"image cache {purpose}", unit="image",
                                   leave=False)):
        with Image.open(image) as im:
            array[i] = decode(im.convert("RGB")).numpy()
    array.flush()
    del array
    partial.replace(path)  # atomic: a killed build leaves no half-written cache behind
    return path


def open_image_cache(path: Path) -> np.ndarray:
    """The cache memory-mapped read-only (each DataLoader worker maps it itself)."""
    return np.load(path, mmap_mode="r")
