"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017).

Two images are likely the same identity when each is among the other's k nearest neighbours.
Each image is encoded as a weighted set of its (expanded) k-reciprocal neighbours; the Jaccard
distance between those sets, blended with the original distance, is the new distance.
Dense ``(Q+G) x (Q+G)`` matrices: meant for evaluation sets of up to some ten thousand images.
"""

from __future__ import annotations

import numpy as np

__all__ = ["k_reciprocal_rerank"]


def _k_reciprocal(ranked: np.ndarray, i: int, k: int) -> np.ndarray:
    """R(i, k): the images among ``i``'s ``k`` nearest (itself included, as in the paper's
    N(p, k)) that also have ``i`` among their ``k`` nearest."""
    forward = ranked[i, : k + 1]
    backward = ranked[forward, : k + 1]
    return forward[(backward == i).any(axis=1)]


def k_reciprocal_rerank(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray,
                        k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked query x gallery distances: ``(1 - lambda) * jaccard + lambda * q_g_dist``.

    ``k1``: size of the k-reciprocal neighbourhoods; ``k2``: neighbours averaged in the local
    query expansion (1: none); ``lambda_value``: weight of the original distance (1 gives
    ``q_g_dist`` back unchanged). Queries take part in the neighbourhoods, as in the paper.
    """
    q_g_dist = np.asarray(q_g_dist)
    n_q, n_g = q_g_dist.shape
    if q_q_dist.shape != (n_q, n_q) or g_g_dist.shape != (n_g, n_g):
        raise ValueError(f"q_q_dist must be {n_q} x {n_q} and g_g_dist {n_g} x {n_g}, got "
                         f"{q_q_dist.shape} and {g_g_dist.shape}")
    n = n_q + n_g
    full = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]]).astype(np.float32)
    full = np.maximum(full, 0)
    # Each row scaled by its largest distance: the weights exp(-d) of different images become
    # comparable, and the order within a row (all that the neighbourhoods use) is unchanged.
    full /= np.maximum(full.max(axis=1, keepdims=True), 1e-12)
    k1 = min(k1, n - 1)
    k2 = max(1, min(k2, n))
    # Only the k1 + 1 nearest of each row are needed: partition, then sort that small block.
    if k1 + 1 < n:
        near = np.argpartition(full, k1, axis=1)[:, : k1 + 1]
    else:
        near = np.tile(np.arange(n), (n, 1))
    ranked = np.take_along_axis(
        near, np.argsort(np.take_along_axis(full, near, axis=1), axis=1, kind="stable"), axis=1)

    # V_p (eq. 7 of the paper): weights exp(-d) on the expanded k-reciprocal set R*(p, k1),
    # normalised to sum 1 so that the Jaccard denominator is 2 - overlap.
    weights = np.zeros((n, n), dtype=np.float32)
    half = max(1, int(round(k1 / 2)))
    for i in range(n):
        neighbours = _k_reciprocal(ranked, i, k1)
        expanded = [neighbours]
        # Expansion (eq. 6): add a neighbour's own R(q, k1/2) when 2/3 of it is in R(p, k1).
        for candidate in neighbours:
            theirs = _k_reciprocal(ranked, candidate, half)
            if len(np.intersect1d(theirs, neighbours)) >= 2 / 3 * len(theirs):
                expanded.append(theirs)
        members = np.unique(np.concatenate(expanded))
        w = np.exp(-full[i, members])
        weights[i, members] = w / w.sum()

    if k2 > 1:  # local query expansion: average the encodings of the k2 nearest
        expanded_weights = np.empty_like(weights)
        for i in range(n):
            expanded_weights[i] = weights[ranked[i, :k2]].mean(axis=0)
        weights = expanded_weights

    # Jaccard distance 1 - sum(min) / sum(max), with sum(max) = 2 - sum(min); only the query's
    # non-zero entries can contribute to the overlap.
    jaccard = np.empty((n_q, n_g), dtype=np.float32)
    gallery = weights[n_q:]
    for i in range(n_q):
        nonzero = np.flatnonzero(weights[i])
        overlap = np.minimum(weights[i, nonzero][None, :], gallery[:, nonzero]).sum(axis=1)
        jaccard[i] = 1 - overlap / (2 - overlap)
    # lambda 1: 0 * jaccard + 1 * d is d exactly, so the original distances come back.
    return (1 - lambda_value) * jaccard + lambda_value * q_g_dist
