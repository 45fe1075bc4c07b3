"""Retrieval metrics beyond image-to-image re-identification: text-to-image retrieval, and
averaging over Monte-Carlo query/gallery draws."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipid.metrics.rank import ranked_chunks

__all__ = ["aggregate_draws", "text_to_image"]


def text_to_image(similarity: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray,
                  ks: Sequence[int] = (1, 5, 10, 20)) -> dict[str, float]:
    """Text-to-image retrieval: ``similarity[i, j]`` of query caption ``i`` and gallery image
    ``j`` (higher is closer). A caption's positives are the gallery images of its identity
    (no camera removal: a caption has no camera); captions with none are skipped. ``R<k>``
    (share of captions with a positive among the k most similar; ties in gallery order) and
    ``mAP`` and ``mINP`` over the remaining captions: the image-to-image protocol with captions
    as queries."""
    hits = dict.fromkeys(ks, 0)
    aps, inps = [], []
    # Negated similarity is a distance with the same order (ties still in gallery order).
    for chunk in ranked_chunks(-np.asarray(similarity), q_ids, g_ids):
        first = chunk.first()
        for k in ks:
            hits[k] += int(np.count_nonzero(first < k))
        aps.append(chunk.average_precision())
        inps.append(chunk.inverse_negative_penalty())
    valid = sum(len(a) for a in aps)
    if valid == 0:
        raise ValueError("no caption has a positive in the gallery")
    return {**{f"R{k}": hits[k] / valid for k in ks}, "mAP": float(np.concatenate(aps).mean()),
            "mINP": float(np.concatenate(inps).mean())}


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
