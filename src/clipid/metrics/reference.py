"""Plain loop-by-loop transcriptions of published protocols: readable, slow, the references that
tests and ``bench/metrics.py`` hold the vectorised versions to.

- :func:`rank_metrics_loop`: the per-query loop of the re-identification protocol (torchreid's
  ``evaluate_rank``, with fast-reid's mINP of Ye et al.), reference of
  :func:`clipid.metrics.rank_metrics` (:func:`evaluate_rank_loop`: its CMC and mAP);
- :func:`verification_loop`: every query-gallery pair, one at a time, into the ROC of "same
  identity?" (fast-reid's pair set: same-identity same-camera pairs left out), reference of
  :func:`clipid.metrics.verification`;
- :func:`average_query_expansion_loop`: alpha-weighted query expansion (Radenovic et al.,
  fast-reid's ``aqe``) one image at a time, reference of
  :func:`clipid.metrics.average_query_expansion`;
- :func:`k_reciprocal_rerank_loop`: k-reciprocal re-ranking (Zhong et al., CVPR 2017) step by
  step as the authors' python code (``re_ranking`` of zhunzhong07/person-re-ranking) does it,
  reference of :func:`clipid.metrics.k_reciprocal_rerank`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["average_query_expansion_loop", "evaluate_rank_loop", "k_reciprocal_rerank_loop",
           "rank_metrics_loop", "verification_loop"]


def evaluate_rank_loop(distmat: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray,
                       q_cams: np.ndarray | None = None, g_cams: np.ndarray | None = None,
                       max_rank: int = 50) -> tuple[np.ndarray, float]:
    cmc, mean_ap, _ = rank_metrics_loop(distmat, q_ids, g_ids, q_cams, g_cams, max_rank)
    return cmc, mean_ap


def rank_metrics_loop(distmat: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray,
                      q_cams: np.ndarray | None = None, g_cams: np.ndarray | None = None,
                      max_rank: int = 50) -> tuple[np.ndarray, float, float]:
    """``(cmc, mAP, mINP)``; a query's INP is its number of positives over the 1-based rank of
    its last positive (Ye et al., TPAMI 2021, as fast-reid's ``eval_market1501``)."""
    distmat = np.asarray(distmat)
    q_ids, g_ids = np.asarray(q_ids), np.asarray(g_ids)
    max_rank = min(max_rank, distmat.shape[1])
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        if q_cams is None:
            keep = np.ones(len(order), dtype=bool)
        else:
            keep = ~((g_ids[order] == q_ids[i]) & (np.asarray(g_cams)[order] == q_cams[i]))
        hits = (g_ids[order] == q_ids[i])[keep].astype(np.float64)
        if not hits.any():
            continue
        last = np.flatnonzero(hits)[-1]
        all_inp.append(hits.cumsum()[last] / (last + 1.0))
        cmc = np.minimum(hits.cumsum(), 1.0)
        cmc = np.pad(cmc, (0, max(0, max_rank - len(cmc))), constant_values=1.0)
        all_cmc.append(cmc[:max_rank])
        precision = hits.cumsum() / np.arange(1, len(hits) + 1)
        all_ap.append(float((precision * hits).sum() / hits.sum()))
    if not all_ap:
        raise ValueError("no query has a positive in the gallery: CMC and mAP are undefined")
    return (np.mean(all_cmc, axis=0).astype(np.float32), float(np.mean(all_ap)),
            float(np.mean(all_inp)))


def verification_loop(distmat: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray,
                      q_cams: np.ndarray | None = None, g_cams: np.ndarray | None = None,
                      fprs: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
                      ) -> tuple[dict[float, float], float]:
    """``({fpr: TPR at FPR <= fpr}, EER)`` over every query-gallery pair, a pair accepted as
    "same identity" when its distance is at most a threshold.

    The pairs: all but those of the same identity and the same camera (fast-reid's
    ``evaluate_roc``); positive when of the same identity. The ROC: one point per threshold,
    below every distance (0, 0), then at each distinct distance (FPR, TPR) = (share of negative
    pairs, share of positive pairs) at a distance <= it. ``TPR at FPR <= f``: the highest TPR
    of a point whose FPR is at most ``f``. EER: where the ROC, its points joined by straight
    lines (ties are a diagonal segment), crosses FNR = 1 - TPR = FPR.
    """
    pairs = []
    for i in range(distmat.shape[0]):
        for j in range(distmat.shape[1]):
            same = q_ids[i] == g_ids[j]
            if same and q_cams is not None and q_cams[i] == g_cams[j]:
                continue
            pairs.append((float(distmat[i, j]), bool(same)))
    n_pos = sum(1 for _, same in pairs if same)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("verification needs positive and negative pairs")
    pairs.sort(key=lambda pair: pair[0])
    points = [(0, 0)]  # (negatives accepted, positives accepted)
    for k, (score, same) in enumerate(pairs):
        neg, pos = points[-1] if k == 0 or pairs[k - 1][0] != score else points.pop()
        points.append((neg + (not same), pos + same))
    tpr = {f: max(p for n, p in points if n <= f * n_neg) / n_pos for f in fprs}

    def gap(point: tuple[int, int]) -> float:  # FNR - FPR
        return 1 - point[1] / n_pos - point[0] / n_neg

    for a, b in zip(points, points[1:], strict=False):
        if gap(b) <= 0:
            fpr_a, fpr_b = a[0] / n_neg, b[0] / n_neg
            return tpr, fpr_a + (fpr_b - fpr_a) * gap(a) / (gap(a) - gap(b))
    raise AssertionError("the ROC ends at (1, 1), where FNR - FPR = -1")


def average_query_expansion_loop(q_feats: np.ndarray, g_feats: np.ndarray, k: int = 5,
                                 alpha: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """alpha-weighted query expansion (Radenovic et al., TPAMI 2018), as fast-reid's ``aqe``
    (one round): every image, query or gallery, becomes the mean of its ``k`` most similar
    images' features (itself among them) weighted by their cosine similarity to the power
    ``alpha``. Neighbours at equal similarity are taken in image order (queries, then
    gallery)."""
    feats = np.concatenate([q_feats, g_feats])
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    expanded = np.empty_like(feats)
    for i in range(len(feats)):
        sims = unit @ unit[i]
        nearest = np.argsort(-sims, kind="stable")[:k]
        weights = sims[nearest] ** alpha
        expanded[i] = np.mean(feats[nearest] * weights[:, None], axis=0)
    return expanded[: len(q_feats)], expanded[len(q_feats):]


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
