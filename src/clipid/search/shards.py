"""Embeddings on disk in shards: ``embeddings-00000.npy``, ``embeddings-00001.npy``, ... of at most
``rows_per_shard`` float32 rows each, in gallery order. A gallery of 10M+ images never sits in
memory whole: the writer holds one shard, the readers memory-map one shard at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from clipid.errors import ClipidError

__all__ = ["ShardWriter", "iter_shards", "sample_rows", "shard_files", "shard_rows"]

PATTERN = "embeddings-{:05d}.npy"


class ShardWriter:
    """Appends row blocks; writes a shard each time ``rows_per_shard`` rows are buffered."""

    def __init__(self, directory: Path, rows_per_shard: int):
        if rows_per_shard < 1:
            raise ClipidError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
        self.directory, self.rows_per_shard = directory, rows_per_shard
        directory.mkdir(parents=True, exist_ok=True)
        for stale in shard_files(directory, must_exist=False):
            stale.unlink()  # a shorter rewrite must not leave shards of the previous one
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.files: list[Path] = []

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float32)
        while len(rows):
            take = min(len(rows), self.rows_per_shard - self._buffered)
            self._buffer.append(rows[:take])
            self._buffered += take
            rows = rows[take:]
            if self._buffered == self.rows_per_shard:
                self._flush()

    def close(self) -> list[Path]:
        if self._buffered:
            self._flush()
        return self.files

    def _flush(self) -> None:
        path = self.directory / PATTERN.format(len(self.files))
        np.save(path, np.ascontiguousarray(np.concatenate(self._buffer)))
        self.files.append(path)
        self._buffer, self._buffered = [], 0


def shard_files(directory: Path, must_exist: bool = True) -> list[Path]:
    files = sorted(directory.glob("embeddings-*.npy"))
    if must_exist and not files:
        raise ClipidError(f"{directory}: no embedding shards (embeddings-00000.npy, ...)")
    return files


def shard_rows(directory: Path) -> list[int]:
    """Rows per shard, read from the .npy headers only."""
    return [int(np.load(p, mmap_mode="r").shape[0]) for p in shard_files(directory)]


def iter_shards(directory: Path) -> Iterator[np.ndarray]:
    """Each shard memory-mapped in turn (read-only, float32)."""
    for path in shard_files(directory):
        yield np.load(path, mmap_mode="r")


def sample_rows(directory: Path, count: int, seed: int) -> np.ndarray:
    """``count`` rows drawn uniformly without replacement from all shards (all of them when
    there are fewer), in gallery order: the same rows however the gallery is cut into shards."""
    sizes = shard_rows(directory)
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    picks = np.arange(total) if total <= count else np.sort(rng.choice(total, count,
                                                                       replace=False))
    out, start = [], 0
    for shard, size in zip(iter_shards(directory), sizes, strict=True):
        local = picks[(picks >= start) & (picks < start + size)] - start
        out.append(np.asarray(shard[local], dtype=np.float32))
        start += size
    return np.concatenate(out) if out else np.empty((0, 0), np.float32)
