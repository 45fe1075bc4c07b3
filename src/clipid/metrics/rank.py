"""Re-identification ranking metrics: CMC and mAP (Market-1501 protocol).

No argsort: CMC and AP only need, for each query, the rank of each of its few positives. That
rank is the number of negatives closer than the positive (a binary search in the row's sorted
negative distances: sorting values is several times faster than sorting indices) plus the
positives before it. Queries are processed in chunks, so temporaries stay a few megabytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["evaluate_rank", "positive_ranks", "summarise"]


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


def positive_ranks(distmat: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray,
                   q_cams: np.ndarray | None = None, g_cams: np.ndarray | None = None,
                   chunk_elements: int = 1 << 22) -> Iterator[tuple[int, np.ndarray]]:
    """For each query with a positive left: ``(query index, ranks)``, ``ranks`` the sorted
    0-based positions of its positives in the gallery ranked by ascending distance, ties in
    gallery order (a stable sort), after removing same-identity same-camera entries."""
    distmat = np.asarray(distmat)
    _check(distmat, q_ids, g_ids, q_cams, g_cams)
    q_codes, g_codes = _codes(q_ids, g_ids)
    if q_cams is not None:
        q_cams, g_cams = np.asarray(q_cams), np.asarray(g_cams)
    n_q, n_g = distmat.shape
    # Gallery indices grouped by identity (ascending within a group): a query's same-identity
    # entries are a slice, found without scanning its row.
    by_code = np.argsort(g_codes, kind="stable")
    lo = np.searchsorted(g_codes[by_code], q_codes, side="left")
    hi = np.searchsorted(g_codes[by_code], q_codes, side="right")
    step = max(1, chunk_elements // max(n_g, 1))
    chunks = [(start, min(start + step, n_q)) for start in range(0, n_q, step)]
    sames = {}

    def sorted_negatives(chunk: tuple[int, int]) -> np.ndarray:
        start, stop = chunk
        same = sames[start] = [by_code[lo[i]:hi[i]] for i in range(start, stop)]
        # Negatives only, sorted per row: same-identity entries go to the end, out of counts.
        negatives = np.array(distmat[start:stop], copy=True)
        negatives[np.repeat(np.arange(stop - start), [len(s) for s in same]),
                  np.concatenate(same)] = np.inf
        negatives.sort(axis=1)
        return negatives

    # Sorting releases the GIL: the next chunks sort in threads while this one is counted.
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        pending = [pool.submit(sorted_negatives, c) for c in chunks[:2]]
        for k, (start, stop) in enumerate(chunks):
            negatives = pending[k].result()
            if k + 2 < len(chunks):
                pending.append(pool.submit(sorted_negatives, chunks[k + 2]))
            pending[k] = None  # free the chunk once counted
            dist = distmat[start:stop]
            yield from _chunk_ranks(dist, negatives, sames.pop(start), start, q_cams, g_cams)


def _chunk_ranks(dist: np.ndarray, negatives: np.ndarray, same: list[np.ndarray], start: int,
                 q_cams: np.ndarray | None, g_cams: np.ndarray | None
                 ) -> Iterator[tuple[int, np.ndarray]]:
    n_g = dist.shape[1]
    for r, same_idx in enumerate(same):
        i = start + r
        pos_idx = same_idx if q_cams is None else same_idx[g_cams[same_idx] != q_cams[i]]
        if len(pos_idx) == 0:
            continue  # no positive left: the query is skipped
        pos_values = dist[r, pos_idx]
        order = np.argsort(pos_values, kind="stable")  # ties among positives: index order
        pos_values, pos_idx = pos_values[order], pos_idx[order]
        closer = np.searchsorted(negatives[r], pos_values, side="left")
        tied = np.searchsorted(negatives[r], pos_values, side="right") - closer
        ranks = np.arange(len(pos_idx)) + closer
        if tied.any():
            not_same = np.ones(n_g, dtype=bool)
            not_same[same_idx] = False
            for m in np.flatnonzero(tied):
                # Negatives at exactly this distance come first when their index is lower.
                equal = np.flatnonzero((dist[r] == pos_values[m]) & not_same)
                ranks[m] += np.count_nonzero(equal < pos_idx[m])
        yield i, ranks


def evaluate_rank(distmat: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray,
                  q_cams: np.ndarray | None = None, g_cams: np.ndarray | None = None,
                  max_rank: int = 50) -> tuple[np.ndarray, float]:
    """``(cmc, mAP)`` as torchreid's ``evaluate_rank`` computes them.

    Gallery ranked by ascending distance; entries with the query's identity and camera are
    removed (no cameras: nothing removed); queries with no positive left are skipped. CMC is the
    first-hit cumulative curve of length ``max_rank`` (at most the gallery size); AP is the mean
    precision at every positive.
    """
    distmat = np.asarray(distmat)
    max_rank = min(max_rank, distmat.shape[1])
    first_hits = np.zeros(max_rank + 1, dtype=np.int64)
    aps = []
    for _, ranks in positive_ranks(distmat, q_ids, g_ids, q_cams, g_cams):
        first_hits[min(ranks[0], max_rank)] += 1
        aps.append(float(np.mean(np.arange(1, len(ranks) + 1) / (ranks + 1))))
    if not aps:
        raise ValueError("no query has a positive in the gallery: CMC and mAP are undefined")
    cmc = np.cumsum(first_hits[:max_rank]) / len(aps)
    return cmc.astype(np.float32), float(np.mean(aps))


def summarise(cmc: np.ndarray, mean_ap: float) -> dict[str, float]:
    """The four numbers every re-identification table reports."""
    def at(k: int) -> float:
        return float(cmc[min(k, len(cmc)) - 1])

    return {"rank1": at(1), "rank5": at(5), "rank10": at(10), "mAP": float(mean_ap)}
