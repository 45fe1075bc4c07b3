"""Re-identification ranking metrics: CMC, mAP (Market-1501 protocol) and mINP (Ye et al.).

No argsort: CMC and AP only need, for each query, the rank of each of its few positives. That
rank is the number of negatives closer than the positive (a binary search in the row's sorted
negative distances: sorting values is several times faster than sorting indices) plus the
positives before it. Queries are processed in chunks, so temporaries stay a few megabytes, and
everything but the sort and one binary search per query is vectorised over the chunk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

__all__ = ["ChunkRanks", "RankMetrics", "evaluate_rank", "positive_ranks", "rank_metrics",
           "ranked_chunks", "summarise"]


class ChunkRanks(NamedTuple):
    """The positives' ranks of one chunk of queries, flat: query ``queries[n]`` owns
    ``ranks[starts[n]:starts[n + 1]]`` (0-based, ascending). Only queries with a positive left."""

    queries: np.ndarray  # (n,) query indices
    starts: np.ndarray   # (n + 1,) offsets into ranks
    ranks: np.ndarray    # (total,) int64

    def first(self) -> np.ndarray:
        """Rank of each query's first hit."""
        return self.ranks[self.starts[:-1]]

    def average_precision(self) -> np.ndarray:
        """AP of each query: mean over its positives of (hits so far) / (rank + 1)."""
        counts = np.diff(self.starts)
        owner = np.repeat(np.arange(len(counts)), counts)
        hits_so_far = np.arange(len(self.ranks)) - self.starts[owner] + 1
        return np.bincount(owner, hits_so_far / (self.ranks + 1), len(counts)) / counts

    def inverse_negative_penalty(self) -> np.ndarray:
        """INP of each query (Ye et al., TPAMI 2021): its number of positives over the rank
        (1-based) of its hardest, i.e. last, positive."""
        return np.diff(self.starts) / (self.ranks[self.starts[1:] - 1] + 1)


def _codes(q_ids: np.ndarray, g_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of identities (strings compare slowly; codes compare in one pass)."""
    q_ids, g_ids = np.asarray(q_ids), np.asarray(g_ids)
    if q_ids.dtype.kind in "iu" and g_ids.dtype.kind in "iu":
        return q_ids.astype(np.int64), g_ids.astype(np.int64)
    _, inverse = np.unique(np.concatenate([q_ids.astype(str), g_ids.astype(str)]),
                           return_inverse=True)
    return inverse[: len(q_ids)], inverse[len(q_ids):]


def _check(distmat: np.ndarray, q_ids, g_ids, q_cams, g_cams) -> None:
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D (queries x gallery), got shape {distmat.shape}")
    n_q, n_g = distmat.shape
    if len(q_ids) != n_q or len(g_ids) != n_g:
        raise ValueError(f"distmat is {n_q} x {n_g} but there are {len(q_ids)} query and "
                         f"{len(g_ids)} gallery ids")
    if (q_cams is None) != (g_cams is None):
        raise ValueError("give cameras for both queries and gallery, or for neither")
    if q_cams is not None and (len(q_cams) != n_q or len(g_cams) != n_g):
        raise ValueError("camera arrays must match the distance matrix's shape")


def _ragged(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``concatenate([arange(a, b) for a, b in zip(lo, hi)])`` without the Python loop."""
    lengths = hi - lo
    offsets = np.cumsum(lengths) - lengths
    return np.arange(lengths.sum()) - np.repeat(offsets - lo, lengths)


class SameIdentity(NamedTuple):
    """Gallery indices grouped by identity (ascending within a group): query ``i``'s
    same-identity entries are ``by_code[lo[i]:hi[i]]``, found without scanning its row."""

    by_code: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def of(cls, q_ids: np.ndarray, g_ids: np.ndarray) -> SameIdentity:
        q_codes, g_codes = _codes(q_ids, g_ids)
        by_code = np.argsort(g_codes, kind="stable")
        ordered = g_codes[by_code]
        return cls(by_code, np.searchsorted(ordered, q_codes, side="left"),
                   np.searchsorted(ordered, q_codes, side="right"))

    def entries(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, columns)`` of the same-identity entries of queries ``start:stop``, rows
        relative to ``start``, row-major, columns ascending within a row."""
        lo, hi = self.lo[start:stop], self.hi[start:stop]
        return np.repeat(np.arange(stop - start), hi - lo), self.by_code[_ragged(lo, hi)]


def ranked_chunks(distmat: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray,
                  q_cams: np.ndarray | None = None, g_cams: np.ndarray | None = None,
                  chunk_elements: int = 1 << 22) -> Iterator[ChunkRanks]:
    """The positives' ranks, chunk by chunk of queries: positions in the gallery ranked by
    ascending distance, ties in gallery order (a stable sort), after removing the entries of
    the query's identity and camera. Queries with no positive left are left out."""
    distmat = np.asarray(distmat)
    _check(distmat, q_ids, g_ids, q_cams, g_cams)
    identity = SameIdentity.of(q_ids, g_ids)
    if q_cams is not None:
        q_cams, g_cams = np.asarray(q_cams), np.asarray(g_cams)
    n_q, n_g = distmat.shape
    step = max(1, chunk_elements // max(n_g, 1))
    chunks = [(start, min(start + step, n_q)) for start in range(0, n_q, step)]

    def sorted_negatives(chunk: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, same = identity.entries(*chunk)  # row-major, index-ascending
        start, stop = chunk
        # Negatives only, sorted per row: same-identity entries go to the end, out of counts.
        negatives = np.array(distmat[start:stop], copy=True)
        negatives[rows, same] = np.inf
        negatives.sort(axis=1)
        return rows, same, negatives

    # Sorting releases the GIL: the next chunks sort in threads while this one is counted.
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        pending = [pool.submit(sorted_negatives, c) for c in chunks[:2]]
        for k, (start, stop) in enumerate(chunks):
            rows, same, negatives = pending[k].result()
            if k + 2 < len(chunks):
                pending.append(pool.submit(sorted_negatives, chunks[k + 2]))
            pending[k] = None  # free the chunk once counted
            yield _chunk_ranks(distmat[start:stop], negatives, rows, same, start, q_cams, g_cams)


def _chunk_ranks(dist: np.ndarray, negatives: np.ndarray, rows: np.ndarray, same: np.ndarray,
                 start: int, q_cams: np.ndarray | None, g_cams: np.ndarray | None) -> ChunkRanks:
    n_neg = dist.shape[1] - np.bincount(rows, minlength=len(dist))  # negatives per row
    positive = np.ones(len(same), dtype=bool) if q_cams is None else \
        g_cams[same] != q_cams[start + rows]
    p_rows, p_idx = rows[positive], same[positive]
    values = dist[p_rows, p_idx]
    # By row, then distance; lexsort is stable, so equal distances keep gallery order.
    order = np.lexsort((values, p_rows))
    p_rows, p_idx, values = p_rows[order], p_idx[order], values[order]
    queries, starts, counts = np.unique(p_rows, return_index=True, return_counts=True)
    starts = np.append(starts, len(p_rows))

    closer = np.empty(len(values), dtype=np.int64)
    for n, r in enumerate(queries):  # one binary search per query: the only Python loop
        closer[starts[n]:starts[n + 1]] = negatives[r].searchsorted(values[starts[n]:
                                                                          starts[n + 1]])
    # Positives before this one, plus negatives closer.
    ranks = np.arange(len(values)) - np.repeat(starts[:-1], counts) + closer
    # A negative at exactly the same distance ranks first when its gallery index is lower.
    at = np.minimum(closer, negatives.shape[1] - 1)
    tied = (closer < n_neg[p_rows]) & (negatives[p_rows, at] == values)
    for m in np.flatnonzero(tied):
        r, j, v = p_rows[m], p_idx[m], values[m]
        a, b = np.searchsorted(rows, [r, r + 1])
        own = same[a:b]  # the row's same-identity entries: not negatives
        ranks[m] += (np.count_nonzero(dist[r, :j] == v)
                     - np.count_nonzero(dist[r, own[own < j]] == v))
    return ChunkRanks(queries + start, starts, ranks)


def positive_ranks(distmat: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray,
                   q_cams: np.ndarray | None = None, g_cams: np.ndarray | None = None,
                   chunk_elements: int = 1 << 22) -> Iterator[tuple[int, np.ndarray]]:
    """Per query with a positive left: ``(query index, ranks)``, ``ranks`` the sorted 0-based
    positions of its positives (see :func:`ranked_chunks`)."""
    for chunk in ranked_chunks(distmat, q_ids, g_ids, q_cams, g_cams, chunk_elements):
        for n, i in enumerate(chunk.queries):
            yield int(i), chunk.ranks[chunk.starts[n]:chunk.starts[n + 1]]


class RankMetrics(NamedTuple):
    cmc: np.ndarray   # first-hit cumulative curve, float32, length max_rank
    mAP: float        # mean average precision
    mINP: float       # mean inverse negative penalty
    queries: int      # queries with a positive left (the ones averaged over)


def rank_metrics(distmat: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray,
                 q_cams: np.ndarray | None = None, g_cams: np.ndarray | None = None,
                 max_rank: int = 50) -> RankMetrics:
    """CMC, mAP and mINP from one ranked pass (fast-reid's ``evaluate_rank``, whose mINP is
    Ye et al.'s: the mean over queries of positives / rank of the hardest positive).

    Gallery ranked by ascending distance; entries with the query's identity and camera are
    removed (no cameras: nothing removed); queries with no positive left are skipped. CMC is the
    first-hit cumulative curve of length ``max_rank`` (at most the gallery size); AP is the mean
    precision at every positive.
    """
    distmat = np.asarray(distmat)
    max_rank = min(max_rank, distmat.shape[1])
    first_hits = np.zeros(max_rank + 1, dtype=np.int64)
    aps, inps = [], []
    for chunk in ranked_chunks(distmat, q_ids, g_ids, q_cams, g_cams):
        first_hits += np.bincount(np.minimum(chunk.first(), max_rank), minlength=max_rank + 1)
        aps.append(chunk.average_precision())
        inps.append(chunk.inverse_negative_penalty())
    valid = sum(len(a) for a in aps)
    if valid == 0:
        raise ValueError(f"no query has a positive in the gallery (none of {distmat.shape[0]} "
                         "after removing same-identity same-camera entries): CMC and mAP are "
                         "undefined")
    cmc = np.cumsum(first_hits[:max_rank]) / valid
    return RankMetrics(cmc.astype(np.float32), float(np.concatenate(aps).mean()),
                       float(np.concatenate(inps).mean()), valid)


def evaluate_rank(distmat: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray,
                  q_cams: np.ndarray | None = None, g_cams: np.ndarray | None = None,
                  max_rank: int = 50) -> tuple[np.ndarray, float]:
    """``(cmc, mAP)`` as torchreid's ``evaluate_rank`` computes them (see
    :func:`rank_metrics`, which adds mINP)."""
    result = rank_metrics(distmat, q_ids, g_ids, q_cams, g_cams, max_rank)
    return result.cmc, result.mAP


def summarise(cmc: np.ndarray, mean_ap: float, ranks: Sequence[int] = (1, 5, 10, 20),
              minp: float | None = None) -> dict[str, float]:
    """The numbers every re-identification table reports: ``R<k>``, the CMC at rank ``k`` (the
    share of queries with a positive among their ``k`` nearest), ``mAP`` and, given, ``mINP``.

    A rank beyond the curve takes its last value, right when the curve covers the whole gallery
    (``evaluate_rank``'s ``max_rank`` >= the largest rank asked, or >= the gallery size).
    """
    def at(k: int) -> float:
        return float(cmc[min(k, len(cmc)) - 1])

    out = {**{f"R{k}": at(k) for k in ranks}, "mAP": float(mean_ap)}
    if minp is not None:
        out["mINP"] = float(minp)
    return out
