"""Retrieval metrics beyond the re-identification protocol: In-shop Recall@K, text-to-image
retrieval, and averaging over Monte-Carlo query/gallery draws."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipid.metrics.rank import positive_ranks

__all__ = ["aggregate_draws", "recall_at_k", "text_to_image"]


def recall_at_k(distmat: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray,
                ks: Sequence[int] = (1, 10, 20)) -> dict[str, float]:
    """In-shop Recall@K: the share of queries with an image of their item among the K nearest
    gallery images. No camera filtering; every query counts, so a query whose item has no
    gallery image is a miss (the In-shop evaluation divides by all queries too)."""
    hits = {k: 0 for k in ks}
    for _, ranks in positive_ranks(distmat, q_ids, g_ids):
        for k in ks:
            hits[k] += int(ranks[0] < k)
    n = np.asarray(distmat).shape[0]
    return {f"R{k}": hits[k] / n for k in ks}


def text_to_image(similarity: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray,
                  ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Text-to-image retrieval: ``similarity[i, j]`` of query caption ``i`` and gallery image
    ``j`` (higher is closer). A caption's positives are the gallery images of its identity;
    captions with none are skipped. Recall@K and mAP over the remaining captions."""
    hits = {k: 0 for k in ks}
    aps = []
    for _, ranks in positive_ranks(-np.asarray(similarity), q_ids, g_ids):
        for k in ks:
            hits[k] += int(ranks[0] < k)
        aps.append(float(np.mean(np.arange(1, len(ranks) + 1) / (ranks + 1))))
    if not aps:
        raise ValueError("no caption has a positive in the gallery")
    return {**{f"R{k}": hits[k] / len(aps) for k in ks}, "mAP": float(np.mean(aps))}


def aggregate_draws(draws: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the query/gallery draws, with ``<name>_std`` (population
    standard deviation, 0 for a single draw) next to it."""
    if not draws:
        raise ValueError("no draws to aggregate")
    out: dict[str, float] = {}
    for key in draws[0]:
        values = np.array([d[key] for d in draws], dtype=np.float64)
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std())
    return out
