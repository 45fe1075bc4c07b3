"""Plain loop-by-loop transcriptions of published protocols: readable, slow, the references that
tests and ``bench/metrics.py`` hold the vectorised versions to.

- :func:`evaluate_rank_loop`: the per-query loop of the re-identification protocol (torchreid's
  ``evaluate_rank``), reference of :func:`clipid.metrics.evaluate_rank`;
- :func:`k_reciprocal_rerank_loop`: k-reciprocal re-ranking (Zhong et al., CVPR 2017) step by
  step as the authors' python code (``re_ranking`` of zhunzhong07/person-re-ranking) does it,
  reference of :func:`clipid.metrics.k_reciprocal_rerank`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["evaluate_rank_loop", "k_reciprocal_rerank_loop"]


def evaluate_rank_loop(distmat: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray,
                       q_cams: np.ndarray | None = None, g_cams: np.ndarray | None = None,
                       max_rank: int = 50) -> tuple[np.ndarray, float]:
    distmat = np.asarray(distmat)
    q_ids, g_ids = np.asarray(q_ids), np.asarray(g_ids)
    max_rank = min(max_rank, distmat.shape[1])
    all_cmc, all_ap = [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        if q_cams is None:
            keep = np.ones(len(order), dtype=bool)
        else:
            keep = ~((g_ids[order] == q_ids[i]) & (np.asarray(g_cams)[order] == q_cams[i]))
        hits = (g_ids[order] == q_ids[i])[keep].astype(np.float64)
        if not hits.any():
            continue
        cmc = np.minimum(hits.cumsum(), 1.0)
        cmc = np.pad(cmc, (0, max(0, max_rank - len(cmc))), constant_values=1.0)
        all_cmc.append(cmc[:max_rank])
        precision = hits.cumsum() / np.arange(1, len(hits) + 1)
        all_ap.append(float((precision * hits).sum() / hits.sum()))
    if not all_ap:
        raise ValueError("no query has a positive in the gallery: CMC and mAP are undefined")
    return np.mean(all_cmc, axis=0).astype(np.float32), float(np.mean(all_ap))


def k_reciprocal_rerank_loop(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray,
                             k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked query x gallery distances, one image, one neighbour at a time.

    As published: the distances of all Q + G images are squared, each column divided by its
    largest value; ``R(p, k)``, the k-reciprocal neighbours of ``p``, are the images among
    ``p``'s ``k + 1`` nearest (itself included) that have ``p`` among their own ``k + 1``
    nearest; ``R(p, k1)`` grows by ``R(c, round(k1 / 2))`` of each of its members ``c`` whose
    set shares strictly more than 2/3 of its images with ``R(p, k1)``; ``p`` is encoded by the
    weights ``exp(-d(p, x))`` on that set, normalised to sum 1, then averaged over its ``k2``
    nearest (local query expansion; ``k2 = 1``: none); the Jaccard distance of two encodings is
    ``1 - sum(min) / (2 - sum(min))``; the result is ``(1 - lambda) * jaccard + lambda * d``
    with ``d`` the normalised squared distance. The one liberty: neighbours are ranked by a
    stable sort (ties in image order), where the published code's quicksort leaves ties in no
    defined order.
    """
    n_q = q_g_dist.shape[0]
    everything = np.concatenate([np.concatenate([q_q_dist, q_g_dist], axis=1),
                                 np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0)
    squared = np.power(everything, 2).astype(np.float32)
    dist = np.transpose(squared / np.max(squared, axis=0))
    n = dist.shape[0]
    nearest = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(p: int, k: int) -> np.ndarray:
        return np.array([c for c in nearest[p, :k + 1] if p in nearest[c, :k + 1]],
                        dtype=np.int64)

    half = int(np.around(k1 / 2))
    encoding = np.zeros((n, n), dtype=np.float32)
    for p in range(n):
        neighbours = reciprocal(p, k1)
        members = list(neighbours)
        for c in neighbours:
            theirs = reciprocal(int(c), half)
            shared = len(set(theirs.tolist()) & set(neighbours.tolist()))
            if shared > 2 / 3 * len(theirs):
                members.extend(theirs)
        members = np.unique(np.array(members, dtype=np.int64))
        weight = np.exp(-dist[p, members])
        encoding[p, members] = weight / np.sum(weight)

    if k2 != 1:
        expanded = np.zeros_like(encoding)
        for p in range(n):
            expanded[p] = np.mean(encoding[nearest[p, :k2]], axis=0)
        encoding = expanded

    # Overlap sum(min) of query p with every image, through the images holding each of p's
    # non-zero entries (as published: an inverted index over the encodings' columns).
    holders = [np.flatnonzero(encoding[:, x]) for x in range(n)]
    jaccard = np.zeros((n_q, n), dtype=np.float32)
    for p in range(n_q):
        overlap = np.zeros(n, dtype=np.float32)
        for x in np.flatnonzero(encoding[p]):
            rows = holders[x]
            overlap[rows] = overlap[rows] + np.minimum(encoding[p, x], encoding[rows, x])
        jaccard[p] = 1 - overlap / (2 - overlap)
    final = jaccard * (1 - lambda_value) + dist[:n_q] * lambda_value
    return final[:, n_q:]
