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
    """The images among ``i``'s ``k`` nearest that also have ``i`` among their ``k`` nearest."""
    forward = ranked[i, : k + 1]
    backward = ranked[forward, : k + 1]
    return forward[(backward == i).any(axis=1)]


def k_reciprocal_rerank(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray,
                        k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked query x gallery distances: ``(1 - lambda) * jaccard + lambda * original``.

    ``k1``: size of the k-reciprocal neighbourhoods; ``k2``: neighbours averaged in the local
    query expansion (1: none); ``lambda_value``: weight of the original distance (1 gives the
    original ranking back).
    """
    n_q, n_g = q_g_dist.shape
    n = n_q + n_g
    full = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]]).astype(np.float32)
    full = np.maximum(full, 0)
    # Each row scaled by its largest distance: distances of different images become
    # comparable, and the order within a row (what ranking uses) is unchanged.
    full /= np.maximum(full.max(axis=1, keepdims=True), 1e-12)
    k1 = min(k1, n - 1)
    ranked = np.argsort(full, axis=1, kind="stable")[:, : k1 + 1]

    weights = np.zeros((n, n), dtype=np.float32)
    half = max(1, int(round(k1 / 2)))
    for i in range(n):
        neighbours = _k_reciprocal(ranked, i, k1)
        expanded = neighbours
        # Expansion: add a neighbour's own (smaller) k-reciprocal set when it mostly agrees.
        for candidate in neighbours:
            theirs = _k_reciprocal(ranked, candidate, half)
            if len(np.intersect1d(theirs, neighbours)) > 2 / 3 * len(theirs):
                expanded = np.append(expanded, theirs)
        expanded = np.unique(expanded)
        w = np.exp(-full[i, expanded])
        weights[i, expanded] = w / w.sum()

    if k2 > 1:  # local query expansion: average the encodings of the k2 nearest
        weights = np.stack([weights[ranked[i, :k2]].mean(axis=0) for i in range(n)])

    jaccard = np.empty((n_q, n_g), dtype=np.float32)
    gallery = weights[n_q:]
    for i in range(n_q):
        nonzero = np.flatnonzero(weights[i])
        overlap = np.minimum(weights[i, nonzero][None, :], gallery[:, nonzero]).sum(axis=1)
        jaccard[i] = 1 - overlap / (2 - overlap)
    return (1 - lambda_value) * jaccard + lambda_value * full[:n_q, n_q:]
