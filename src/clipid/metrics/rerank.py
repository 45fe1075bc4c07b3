"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), the re-ranking behind the "+RK" figures of re-id papers.

Two images are likely the same identity when each is among the other's k nearest neighbours.
Each image is encoded as a weighted set of its (expanded) k-reciprocal neighbours; the Jaccard
distance between those sets, blended with the original distance, is the new distance.

The published algorithm (the authors' python ``re_ranking``; transcribed loop by loop in
:func:`clipid.metrics.reference.k_reciprocal_rerank_loop`), vectorised: only the nearest
neighbours of each image are sorted, and the encodings, a few dozen non-zero weights per image,
are kept sparse (flat arrays of entries sorted by image, then neighbour); the (Q+G) x (Q+G)
distances stay dense, as published. Every floating-point sum is taken in the published order,
so the distances come out bit-identical to the loop's (``bench/metrics.py`` reports it; the
tests ask for identical rankings and distances within 1e-6).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from clipid.metrics.rank import _ragged

__all__ = ["k_reciprocal_rerank"]


class _Entries(NamedTuple):
    """Sparse rows: entry ``e`` is ``row[e], col[e], value[e]``, sorted by row, then column."""

    row: np.ndarray
    col: np.ndarray
    value: np.ndarray

    def bounds(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(start, stop)`` of each of the ``n`` rows' entries."""
        start = np.searchsorted(self.row, np.arange(n))
        return start, np.append(start[1:], len(self.row))


def _normalised_squared(q_g_dist: np.ndarray, q_q_dist: np.ndarray,
                        g_g_dist: np.ndarray) -> np.ndarray:
    """All ``(Q+G) x (Q+G)`` distances squared, float32, each column divided by its largest
    value and transposed (row ``i`` is image ``i``'s distances), as published."""
    n_q, n_g = q_g_dist.shape
    if q_q_dist.shape != (n_q, n_q) or g_g_dist.shape != (n_g, n_g):
        raise ValueError(f"q_q_dist must be {n_q} x {n_q} and g_g_dist {n_g} x {n_g}, got "
                         f"{q_q_dist.shape} and {g_g_dist.shape}")
    squared = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]])
    # Squared in the inputs' precision, then float32, as published (in place: one n^2 copy).
    squared = np.power(squared, 2, out=squared).astype(np.float32, copy=False)
    if not np.isfinite(squared).all():
        raise ValueError("re-ranking needs finite distances")
    largest = squared.max(axis=0)
    if (largest == 0).any():
        raise ValueError("re-ranking: an image is at distance 0 from every image")
    # Row i is column i over its largest value, written row-major (each image's distances
    # contiguous for the neighbour search) tile by tile: a transposed copy in cache-sized tiles
    # is twice as fast as one strided pass.
    out, n, tile = np.empty_like(squared), len(squared), 64
    for a in range(0, n, tile):
        for b in range(0, n, tile):
            np.divide(squared[b:b + tile, a:a + tile].T, largest[a:a + tile, None],
                      out=out[a:a + tile, b:b + tile])
    return out


def _nearest(dist: np.ndarray, m: int) -> np.ndarray:
    """The first ``m`` columns of ``argsort(dist, axis=1, kind="stable")`` of non-negative
    float32 distances, sorting only them.

    The m-th smallest of a sample of each row's columns bounds the row's m-th smallest from
    above, so the entries up to that bound (about ``m * n / sample`` of them) hold the row's
    ``m`` nearest, ties included; only they are sorted, by distance, then index."""
    n = dist.shape[1]
    if m >= n:
        return np.argsort(dist, axis=1, kind="stable")
    step = max(1, n // max(m, int(np.sqrt(m * n))))
    bound = np.partition(dist[:, ::step], m - 1, axis=1)[:, m - 1:m]
    row, col = np.nonzero(dist <= bound)  # by row, then column
    # Non-negative float32 values order as their bit patterns: one stable sort of
    # (row, distance) keys puts each row's candidates by distance, ties by column.
    keys = row.astype(np.uint64) << np.uint64(32) | dist[row, col].view(np.uint32)
    order = np.argsort(keys, kind="stable")
    start = np.searchsorted(row, np.arange(len(dist)))
    return col[order][start[:, None] + np.arange(m)]


def _reciprocal(near: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``R(i, k)`` of every image: the ``k + 1`` nearest and a mask of those that have ``i``
    among their own ``k + 1`` nearest (the published order: by distance from ``i``)."""
    forward = near[:, : k + 1]
    backward = near[forward, : k + 1]
    return forward, (backward == np.arange(len(near))[:, None, None]).any(axis=2)


def _expanded_sets(near: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """``(image, member)`` pairs of the expanded sets ``R*(i, k1)``, sorted: ``R(i, k1)`` plus
    ``R(c, round(k1 / 2))`` of each member ``c`` that shares strictly more than 2/3 of it."""
    n = len(near)
    forward, mask = _reciprocal(near, k1)
    theirs, their_mask = _reciprocal(near, int(np.around(k1 / 2)))
    owner, slot = np.nonzero(mask)
    candidate = forward[owner, slot]
    keys = np.sort(owner * n + candidate)  # R(i, k1) as sorted keys i * n + member
    asked = owner[:, None] * n + theirs[candidate]
    found = np.minimum(np.searchsorted(keys, asked), len(keys) - 1)
    shared = ((keys[found] == asked) & their_mask[candidate]).sum(axis=1)
    size = their_mask[candidate].sum(axis=1)
    grows = shared > 2 / 3 * size
    grown = np.nonzero(their_mask[candidate[grows]])
    members = np.unique(np.concatenate(
        [keys, owner[grows][grown[0]] * n + theirs[candidate[grows]][grown]]))
    return members // n, members % n


def _row_sums(values: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """``[values[a:b].sum() for a, b in zip(start, stop)]``, float32, each sum taken exactly as
    numpy sums one row (pairwise, in blocks set by the row's length): rows of equal length are
    summed together."""
    sums = np.zeros(len(start), dtype=values.dtype)
    lengths = stop - start
    for length in np.unique(lengths[lengths > 0]):
        rows = np.flatnonzero(lengths == length)
        sums[rows] = values[start[rows, None] + np.arange(length)].sum(axis=1)
    return sums


def _encodings(dist: np.ndarray, near: np.ndarray, k1: int) -> _Entries:
    """``V``: weights ``exp(-d)`` on each image's expanded set, normalised to sum 1."""
    row, col = _expanded_sets(near, k1)
    weight = np.exp(-dist[row, col])
    start, stop = _Entries(row, col, weight).bounds(len(dist))
    return _Entries(row, col, weight / _row_sums(weight, start, stop)[row])


def _query_expansion(v: _Entries, near: np.ndarray, k2: int) -> _Entries:
    """Each encoding replaced by the mean of its ``k2`` nearest images' encodings."""
    n = len(near)
    start, stop = v.bounds(n)
    keys, values = [], []
    for t in range(k2):  # neighbour by neighbour: each sum in the published order
        source = near[:, t]
        take = _ragged(start[source], stop[source])
        owner = np.repeat(np.arange(n), stop[source] - start[source])
        keys.append(owner * n + v.col[take])
        values.append(v.value[take])
    unique, position = np.unique(np.concatenate(keys), return_inverse=True)
    total = np.zeros(len(unique), dtype=np.float32)
    np.add.at(total, position, np.concatenate(values))  # in array order: neighbour t by t
    return _Entries(unique // n, unique % n, total / np.float32(k2))


def _jaccard(v: _Entries, n_q: int, n: int, chunk_entries: int = 1 << 23) -> np.ndarray:
    """``1 - sum(min) / (2 - sum(min))`` of every query's encoding with every gallery image's.

    ``sum(min)`` only has terms where both are non-zero: each query entry meets the gallery
    entries of its column. The terms of one pair are added in column order, as published."""
    in_gallery = v.row >= n_q
    by_col = np.lexsort((v.row[in_gallery], v.col[in_gallery]))
    g_row = v.row[in_gallery][by_col] - n_q
    g_col, g_value = v.col[in_gallery][by_col], v.value[in_gallery][by_col]
    col_start = np.searchsorted(g_col, np.arange(n))
    col_stop = np.searchsorted(g_col, np.arange(n), side="right")
    overlap = np.zeros(n_q * (n - n_q), dtype=np.float32)
    queries = np.flatnonzero(~in_gallery)  # sorted by query, then column
    terms = col_stop[v.col[queries]] - col_start[v.col[queries]]
    ends = np.cumsum(terms)
    first = 0
    while first < len(queries):  # chunks of about chunk_entries terms
        last = max(first + 1, int(np.searchsorted(ends, ends[first] - terms[first]
                                                  + chunk_entries, side="right")))
        q = queries[first:last]
        take = _ragged(col_start[v.col[q]], col_stop[v.col[q]])
        owner = np.repeat(q, terms[first:last])
        np.add.at(overlap, v.row[owner] * (n - n_q) + g_row[take],
                  np.minimum(v.value[owner], g_value[take]))
        first = last
    overlap = overlap.reshape(n_q, n - n_q)
    return 1 - overlap / (2 - overlap)


def k_reciprocal_rerank(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray,
                        k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked query x gallery distances, float32: ``(1 - lambda) * jaccard + lambda * d``.

    The inputs are distances (euclidean, as in the paper: they are squared here); ``d`` is the
    squared distance divided by its column's largest value over all Q + G images. ``k1``: size
    of the k-reciprocal neighbourhoods; ``k2``: neighbours averaged in the local query
    expansion (1: none); ``lambda_value``: weight of ``d`` (1 gives ``d``: the original
    ranking). Queries take part in the neighbourhoods, as in the paper. Neighbours at equal
    distance are ranked in image order (queries, then gallery).
    """
    if k1 < 1 or k2 < 1:
        raise ValueError(f"re-ranking needs k1 >= 1 and k2 >= 1, got k1={k1}, k2={k2}")
    q_g_dist, q_q_dist, g_g_dist = map(np.asarray, (q_g_dist, q_q_dist, g_g_dist))
    dist = _normalised_squared(q_g_dist, q_q_dist, g_g_dist)
    n_q, n = q_g_dist.shape[0], len(dist)
    # Neighbour lists longer than the Q + G images are all of them, as slicing gives.
    near = _nearest(dist, min(n, max(k1, k2 - 1) + 1))
    encodings = _encodings(dist, near, k1)
    if k2 != 1:
        encodings = _query_expansion(encodings, near, min(k2, n))
    jaccard = _jaccard(encodings, n_q, n)
    return jaccard * (1 - lambda_value) + dist[:n_q, n_q:] * lambda_value
