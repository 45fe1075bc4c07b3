"""Nearest-neighbour indexes over L2-normalised embeddings: cosine similarity is the inner
product, so every backend ranks by inner product (higher is closer).

``ExactIndex`` is one matrix product per query batch: exact, and the right choice up to a few
hundred thousand vectors. ``FaissIndex`` wraps faiss-cpu's IVF-Flat or HNSW for galleries of
millions, where an approximate answer in a millisecond beats an exact one in a second.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from clipid.config import FaissParams
from clipid.errors import ClipidError

log = logging.getLogger(__name__)

__all__ = ["ExactIndex", "FaissIndex", "IVFPQIndex", "SearchIndex", "build_index", "load_index",
           "neighbour_recall", "recall_against_exact"]


class SearchIndex(Protocol):
    dim: int

    def __len__(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``, both ``(Q, min(k, N))``, best first."""
        ...


def _as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if queries.shape[1] != dim:
        raise ClipidError(f"query embeddings have {queries.shape[1]} dimensions, the index {dim}")
    return queries


class ExactIndex:
    """Brute-force inner product, in blocks so that ``Q x N`` scores never sit in memory whole."""

    def __init__(self, vectors: np.ndarray, block: int = 262_144):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.dim = int(self.vectors.shape[1])
        self.block = block

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _as_queries(queries, self.dim)
        k = min(k, len(self))
        best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        best_i = np.zeros((len(queries), 0), dtype=np.int64)
        for start in range(0, len(self), self.block):
            scores = queries @ self.vectors[start:start + self.block].T
            kk = min(k, scores.shape[1])
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            best_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
            best_i = np.concatenate([best_i, top + start], axis=1)
            if best_s.shape[1] > k:  # keep the running top k of the blocks seen so far
                keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
                best_s = np.take_along_axis(best_s, keep, 1)
                best_i = np.take_along_axis(best_i, keep, 1)
        # Best first; equal scores in gallery order, so results are deterministic.
        order = np.lexsort((best_i, -best_s), axis=1)
        return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is in requirements.lock
        raise ClipidError("search.backend faiss needs the faiss-cpu package "
                          "(pip install faiss-cpu)") from exc
    return faiss


class FaissIndex:
    """An IVF-Flat or HNSW index over inner product (faiss-cpu)."""

    def __init__(self, index, params: FaissParams):
        self.index = index
        self.params = params
        self.dim = int(index.d)
        self._apply_search_params()

    @classmethod
    def build(cls, vectors: np.ndarray, params: FaissParams, seed: int = 0) -> FaissIndex:
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = vectors.shape
        if params.type == "hnsw":
            index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params.ef_construction
        elif params.type == "ivf":
            # faiss wants >= 39 training points per cell; a small gallery gets fewer cells.
            nlist = max(1, min(params.nlist, n // 39))
            if nlist < params.nlist:
                log.info("faiss ivf: %d vectors, nlist %d -> %d", n, params.nlist, nlist)
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = vectors if n <= params.train_size else \
                vectors[np.sort(rng.choice(n, params.train_size, replace=False))]
            index.cp.seed = seed
            index.train(sample)
        else:
            raise ClipidError(f"search.faiss.type: '{params.type}' is not one of ivf, hnsw")
        index.add(vectors)
        return cls(index, params)

    def _apply_search_params(self) -> None:
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = min(self.params.nprobe, self.index.nlist)
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = self.params.ef_search

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _as_queries(queries, self.dim)
        scores, ids = self.index.search(queries, min(k, len(self)))
        return scores, ids.astype(np.int64)

    def save(self, path: Path) -> None:
        _faiss().write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, params: FaissParams) -> FaissIndex:
        if not path.is_file():
            raise ClipidError(f"{path}: faiss index not found; rerun the 'index' stage")
        return cls(_faiss().read_index(str(path)), params)


class IVFPQIndex(FaissIndex):
    """faiss IVF-PQ over inner product for galleries beyond memory: each vector is stored as
    ``pq_m`` codes of ``pq_nbits`` bits. Built from embedding shards read one at a time
    (:mod:`clipid.search.shards`): k-means and the PQ codebooks train on ``train_size`` rows
    sampled across the shards, then every shard is added in turn."""

    @classmethod
    def build_from_shards(cls, directory: Path, params: FaissParams, seed: int = 0
                          ) -> IVFPQIndex:
        from clipid.search.shards import iter_shards, sample_rows, shard_rows

        faiss = _faiss()
        n = sum(shard_rows(directory))
        sample = sample_rows(directory, params.train_size, seed)
        dim = int(sample.shape[1])
        if dim % params.pq_m:
            raise ClipidError(f"search.faiss.pq_m: {params.pq_m} does not divide the "
                              f"embedding dimension {dim}")
        # faiss wants >= 39 training points per cell, and a PQ codebook needs at least
        # 2**nbits of them: a small gallery gets fewer cells and fewer bits.
        nlist = max(1, min(params.nlist, n // 39))
        nbits = min(params.pq_nbits, max(1, int(np.log2(max(2, len(sample))))))
        if (nlist, nbits) != (params.nlist, params.pq_nbits):
            log.info("faiss ivfpq: %d vectors, nlist %d -> %d, nbits %d -> %d", n,
                     params.nlist, nlist, params.pq_nbits, nbits)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, params.pq_m, nbits,
                                 faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.pq.cp.seed = seed
        index.train(np.ascontiguousarray(sample))
        del sample
        for shard in iter_shards(directory):
            index.add(np.ascontiguousarray(shard, dtype=np.float32))
        return cls(index, params)

    @classmethod
    def build(cls, vectors: np.ndarray, params: FaissParams, seed: int = 0) -> IVFPQIndex:
        """From vectors in memory (the index stage), through temporary shards of
        ``shard_rows`` rows: the same index as the shards of a gallery beyond memory give."""
        import tempfile

        from clipid.search.shards import ShardWriter

        with tempfile.TemporaryDirectory() as tmp:
            writer = ShardWriter(Path(tmp), params.shard_rows)
            writer.append(vectors)
            writer.close()
            return cls.build_from_shards(Path(tmp), params, seed)


def neighbour_recall(truth: np.ndarray, found: np.ndarray) -> float:
    """Share of the true neighbours ``truth`` ``(Q, k)`` that ``found`` ``(Q, k)`` holds."""
    return sum(len(set(t) & set(f)) for t, f in zip(truth, found, strict=True)) / truth.size


def recall_against_exact(index: SearchIndex, vectors: np.ndarray, k: int = 10,
                         queries: int = 1000, seed: int = 0) -> float:
    """Recall@``k`` of ``index`` against exact search, over up to ``queries`` of the indexed
    ``vectors`` used as queries."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(vectors), min(queries, len(vectors)), replace=False)
    k = min(k, len(vectors))
    _, truth = ExactIndex(vectors).search(vectors[picks], k)
    _, found = index.search(vectors[picks], k)
    return neighbour_recall(truth, found)


def build_index(vectors: np.ndarray, backend: str, faiss_params: FaissParams | None = None,
                seed: int = 0) -> SearchIndex:
    if backend == "exact":
        return ExactIndex(vectors)
    if backend == "faiss" and faiss_params is not None and faiss_params.type == "ivfpq":
        return IVFPQIndex.build(vectors, faiss_params, seed=seed)
    if backend == "faiss":
        return FaissIndex.build(vectors, faiss_params or FaissParams(), seed=seed)
    raise ClipidError(f"search.backend: '{backend}' is not one of exact, faiss")


def load_index(vectors: np.ndarray, backend: str, path: Path,
               faiss_params: FaissParams | None = None) -> SearchIndex:
    """The backend a gallery index was built with, over its stored ``vectors``."""
    if backend == "faiss":
        return FaissIndex.load(path, faiss_params or FaissParams())
    return build_index(vectors, backend)
