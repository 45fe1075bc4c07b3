"""The plain per-query loop of the re-identification protocol: readable, slow, the reference
that tests and ``bench/metrics.py`` hold :func:`clipid.metrics.evaluate_rank` to."""

from __future__ import annotations

import numpy as np

__all__ = ["evaluate_rank_loop"]


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
