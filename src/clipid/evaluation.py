"""The evaluation every stage shares: image-to-image re-identification and text-to-image search
on the prepared query/gallery split, averaged over its Monte-Carlo draws."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from clipid.config import EvalParams
from clipid.data.dataset import PreparedData
from clipid.features import image_features, text_features
from clipid.metrics import (
    REPORTED_FPRS,
    ROC_GRID,
    aggregate_draws,
    average_query_expansion,
    k_reciprocal_rerank,
    rank_metrics,
    summarise,
    text_to_image,
    verification,
)
from clipid.models.factory import ClipModel
from clipid.models.visual import text_space
from clipid.runtime import resolve_precision

log = logging.getLogger(__name__)

__all__ = ["EvalResult", "evaluate", "write_results"]


@dataclass
class EvalResult:
    metrics: dict[str, Any]   # {"i2i": {...}, "t2i": {...}, "queries": N, "draws": D}
    cmc: np.ndarray           # image-to-image CMC, averaged over draws
    examples: list[dict[str, Any]] = field(default_factory=list)  # ranked lists for the report
    roc: np.ndarray | None = None  # image-to-image TPR at each FPR of ROC_GRID, over draws


def _examples(dist: np.ndarray, q: Any, g: Any, count: int, top_k: int) -> list[dict[str, Any]]:
    """Ranked galleries of ``count`` queries spread evenly over the query set (the same queries
    for every stage, so that the report can put them side by side)."""
    picks = np.linspace(0, len(q) - 1, num=min(count, len(q))).round().astype(int)
    g_images, g_ids = g["image"].to_numpy(), g["item_id"].to_numpy()
    out = []
    for i in picks:
        order = np.argsort(dist[i], kind="stable")[:top_k]
        out.append({"query": q["image"].iloc[i], "item_id": q["item_id"].iloc[i],
                    "gallery": [str(x) for x in g_images[order]],
                    "hits": [bool(x) for x in g_ids[order] == q["item_id"].iloc[i]]})
    return out


def _canonical(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows by image path: the order every metric, tie and example is computed in, so that
    nothing depends on the order of the manifest's rows."""
    return rows.sort_values(["image", "item_id", "camera"], kind="stable").reset_index(drop=True)


def _cameras(q: pd.DataFrame, g: pd.DataFrame) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Cameras for the same-identity same-camera removal; -1 (unknown) never matches a camera,
    so only entries with both cameras known and equal are removed. None: no camera known."""
    q_cams, g_cams = q["camera"].to_numpy(), g["camera"].to_numpy()
    if (q_cams < 0).all() or (g_cams < 0).all():
        return None, None
    return np.where(q_cams < 0, -1, q_cams), np.where(g_cams < 0, -2, g_cams)


def _without_positive(q_ids: np.ndarray, g_ids: np.ndarray, q_cams: np.ndarray | None,
                      g_cams: np.ndarray | None) -> int:
    """Queries with no gallery image of their identity left after the camera removal: the
    re-id protocol skips them, so they are counted and reported instead of lost silently."""
    if q_cams is None:
        return int((~np.isin(q_ids, g_ids)).sum())
    gallery = pd.DataFrame({"id": g_ids, "cam": g_cams})
    per_id = gallery.groupby("id").size().reindex(q_ids, fill_value=0).to_numpy()
    same_camera = gallery.groupby(["id", "cam"]).size().reindex(
        pd.MultiIndex.from_arrays([q_ids, q_cams]), fill_value=0).to_numpy()
    return int((per_id == same_camera).sum())


def _euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances of unit vectors, the distance k-reciprocal re-ranking squares."""
    return np.sqrt(np.maximum(2 - 2 * (a @ b.T), 0))


def _caption_features(clip: ClipModel, data: PreparedData, test: pd.DataFrame,
                      params: EvalParams, device: torch.device, dtype: torch.dtype
                      ) -> dict[str, np.ndarray]:
    """Query image path -> the embedding of its caption ({} without captions or text tower)."""
    if not data.texts or not hasattr(clip.model, "encode_text"):
        return {}
    queries = test[test["split"] == "query"].drop_duplicates("image").sort_values("image")
    captions = data.captions(queries)
    unique = sorted(set(captions))
    encoded = text_features(clip.model, clip.tokenizer, unique, batch_size=params.batch_size,
                            device=device, dtype=dtype).numpy()
    by_caption = dict(zip(unique, encoded, strict=True))
    return {image: by_caption[c] for image, c in zip(queries["image"], captions, strict=True)}


def _image_distances(qf: np.ndarray, gf: np.ndarray, params: EvalParams) -> np.ndarray:
    """Image-to-image distances: cosine, after average query expansion (``eval.aqe``) and then
    k-reciprocal re-ranking (``eval.rerank``), in fast-reid's order."""
    if params.aqe:
        qf, gf = average_query_expansion(qf, gf, k=params.aqe_k, alpha=params.aqe_alpha)
        qf = qf / np.linalg.norm(qf, axis=1, keepdims=True)
        gf = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    if params.rerank:
        return k_reciprocal_rerank(_euclidean(qf, gf), _euclidean(qf, qf), _euclidean(gf, gf),
                                   k1=params.rerank_k1, k2=params.rerank_k2,
                                   lambda_value=params.rerank_lambda)
    return 1.0 - qf @ gf.T


def _score_draw(q: pd.DataFrame, g: pd.DataFrame, qf: np.ndarray, gf: np.ndarray,
                caption_feats: dict[str, np.ndarray], params: EvalParams
                ) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray | None]:
    """``(metrics, cmc, distances, roc)`` of one query/gallery draw (rows in canonical order);
    ``roc``: TPR at each FPR of ``ROC_GRID`` (None without ``eval.verification``)."""
    dist = _image_distances(qf, gf, params)
    q_ids, g_ids = q["item_id"].to_numpy(), g["item_id"].to_numpy()
    q_cams, g_cams = _cameras(q, g)
    skipped = _without_positive(q_ids, g_ids, q_cams, g_cams)
    if skipped:
        log.warning("%d of %d queries have no gallery image of their identity (after removing "
                    "same-camera ones) and are left out of the image-to-image metrics",
                    skipped, len(q))
    ranks = params.reported_ranks()
    ranked = rank_metrics(dist, q_ids, g_ids, q_cams, g_cams,
                          max_rank=max(params.max_rank, *ranks))
    i2i = summarise(ranked.cmc, ranked.mAP, ranks, minp=ranked.mINP)
    roc = None
    if params.verification:
        rates = verification(dist, q_ids, g_ids, q_cams, g_cams,
                             fprs=sorted({*REPORTED_FPRS, *ROC_GRID}))
        i2i.update(rates.summary())
        roc = np.array([rates.tpr[f] for f in ROC_GRID])
    result: dict[str, Any] = {"i2i": i2i, "queries": len(q), "gallery": len(g)}
    if caption_feats:
        tf = np.stack([caption_feats[p] for p in q["image"]])
        # Texts meet a concat embedding's projected part (CLIP's own space).
        gt = text_space(gf, tf.shape[1])
        result["t2i"] = text_to_image(tf @ gt.T, q_ids, g_ids, ks=ranks)
    return result, ranked.cmc[: params.max_rank], dist, roc


def evaluate(clip: ClipModel, data: PreparedData, params: EvalParams,
             device: str | torch.device = "cpu", examples: int = 4, top_k: int = 5
             ) -> EvalResult | None:
    """Embed every test image once, then score each draw.

    ``examples`` queries of the first draw keep their ``top_k`` ranked gallery images.
    Every figure is independent of the order of the manifest's rows. In a process group the
    ranks share the embedding and rank 0 scores; the others return ``None``.
    """
    test = data.table[data.table["split"].isin(["query", "gallery"])]
    images = sorted(test["image"].unique())
    if not images:
        raise ValueError(f"{data.root / 'manifest.csv'}: no query or gallery images")
    position = {image: i for i, image in enumerate(images)}
    device = torch.device(device)
    dtype = resolve_precision(params.precision, device, "eval.precision")
    # With SIE, each test image gets its camera's embedding, as in CLIP-ReID's test pass.
    cameras = clip.spec.camera_indices(
        test.drop_duplicates("image").set_index("image").loc[images, "camera"].tolist())
    feats = image_features(clip.model, [data.root / p for p in images], clip.preprocess_val,
                           batch_size=params.batch_size, workers=params.workers, flip=params.flip,
                           device=device, dtype=dtype, shard=True, cameras=cameras)
    if feats is None:
        return None
    feats = feats.numpy()
    caption_feats = _caption_features(clip, data, test, params, device, dtype)

    per_draw, cmcs, rocs, ranked = [], [], [], []
    for draw in data.draws:
        q, g = _canonical(data.rows("query", draw)), _canonical(data.rows("gallery", draw))
        qf = feats[[position[p] for p in q["image"]]]
        gf = feats[[position[p] for p in g["image"]]]
        result, cmc, dist, roc = _score_draw(q, g, qf, gf, caption_feats, params)
        per_draw.append(result)
        cmcs.append(cmc)
        rocs.append(roc)
        if not ranked:
            ranked = _examples(dist, q, g, examples, top_k)

    metrics: dict[str, Any] = {}
    for block in ("i2i", "t2i"):
        if block in per_draw[0]:
            metrics[block] = aggregate_draws([r[block] for r in per_draw])
    metrics["queries"] = per_draw[0]["queries"]
    metrics["gallery"] = per_draw[0]["gallery"]
    metrics["draws"] = len(per_draw)
    length = min(len(c) for c in cmcs)
    roc = None if rocs[0] is None else np.mean(rocs, axis=0)  # vertical averaging over draws
    return EvalResult(metrics, np.mean([c[:length] for c in cmcs], axis=0), ranked, roc)


def write_results(result: EvalResult, metrics_path: Path, cmc_path: Path,
                  extra: dict[str, Any] | None = None, examples_path: Path | None = None,
                  roc_path: Path | None = None) -> None:
    """``metrics/<stage>.json``, the CMC and ROC curves as DVC plot files and the ranked
    examples. The ROC file is written always (DVC plot outputs must exist): without
    ``eval.verification`` it holds no points."""
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    content = {**result.metrics, **(extra or {})}
    metrics_path.write_text(json.dumps(_rounded(content), indent=2) + "\n", encoding="utf-8")
    cmc_path.parent.mkdir(parents=True, exist_ok=True)
    curve = [{"rank": i + 1, "cmc": round(float(v), 6)} for i, v in enumerate(result.cmc)]
    cmc_path.write_text(json.dumps(curve, indent=1) + "\n", encoding="utf-8")
    if roc_path is not None:
        roc_path.parent.mkdir(parents=True, exist_ok=True)
        points = [] if result.roc is None else [
            {"fpr": f, "tpr": round(float(t), 6)} for f, t in zip(ROC_GRID, result.roc,
                                                                 strict=True)]
        roc_path.write_text(json.dumps(points, indent=1) + "\n", encoding="utf-8")
    if examples_path is not None:
        examples_path.parent.mkdir(parents=True, exist_ok=True)
        examples_path.write_text(json.dumps(result.examples, indent=1) + "\n", encoding="utf-8")


def _rounded(value: Any) -> Any:
    """Six decimals: enough for any comparison, and metric diffs stay readable."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (float, np.floating)):
        return round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value
