"""Average query expansion (alpha-weighted, Radenovic et al., "Fine-tuning CNN Image Retrieval
with No Human Annotation", TPAMI 2018), the "+AQE" of re-identification tables, as fast-reid's
``aqe`` does it: every image, query or gallery, is replaced by the mean of its ``k`` most
similar images' features (itself among them), each weighted by its cosine similarity to the
power ``alpha``. One round (fast-reid's default ``qe_times``). The plain transcription is
:func:`clipid.metrics.reference.average_query_expansion_loop`; this is it in row blocks: the
(Q+G) x (Q+G) similarities are never all in memory.
"""

from __future__ import annotations

import numpy as np

__all__ = ["average_query_expansion"]


def _nearest(sims: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of the ``k`` largest values, largest first, ties in column order
    (the first ``k`` of a stable sort by descending value)."""
    n = sims.shape[1]
    kth = np.partition(sims, n - k, axis=1)[:, n - k]
    rows, cols = np.nonzero(sims >= kth[:, None])  # every row has at least k
    order = np.lexsort((cols, -sims[rows, cols], rows))
    start = np.searchsorted(rows[order], np.arange(len(sims)))
    return cols[order][start[:, None] + np.arange(k)]


def average_query_expansion(q_feats: np.ndarray, g_feats: np.ndarray, k: int = 5,
                            alpha: float = 3.0, block_elements: int = 1 << 22
                            ) -> tuple[np.ndarray, np.ndarray]:
    """``(expanded queries, expanded gallery)``, in the features' dtype and not normalised
    (as published; normalise before taking cosine distances). ``k`` beyond the number of
    images takes them all."""
    if k < 1 or alpha < 0:
        raise ValueError(f"query expansion needs k >= 1 and alpha >= 0, got k={k}, "
                         f"alpha={alpha}")
    feats = np.concatenate([q_feats, g_feats])
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    k = min(k, len(feats))
    expanded = np.empty_like(feats)
    step = max(1, block_elements // max(len(feats), 1))
    for start in range(0, len(feats), step):
        sims = unit[start:start + step] @ unit.T
        nearest = _nearest(sims, k)
        with np.errstate(invalid="ignore"):  # reported below, in words
            weights = np.take_along_axis(sims, nearest, axis=1) ** alpha
        if np.isnan(weights).any():
            raise ValueError(f"query expansion: a negative similarity among the {k} nearest "
                             f"has no real power {alpha} (use an integer alpha or a smaller k)")
        expanded[start:start + step] = np.mean(feats[nearest] * weights[..., None], axis=1)
    return expanded[: len(q_feats)], expanded[len(q_feats):]
