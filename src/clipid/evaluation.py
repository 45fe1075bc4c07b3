"""The evaluation every stage shares: image-to-image re-identification and text-to-image search
on the prepared query/gallery split, averaged over its Monte-Carlo draws."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipid.config import EvalParams
from clipid.data.dataset import PreparedData
from clipid.features import image_features, text_features
from clipid.metrics import (
    aggregate_draws,
    evaluate_rank,
    k_reciprocal_rerank,
    recall_at_k,
    summarise,
    text_to_image,
)
from clipid.models.factory import ClipModel
from clipid.runtime import resolve_precision

log = logging.getLogger(__name__)

__all__ = ["EvalResult", "evaluate", "write_results"]


@dataclass
class EvalResult:
    metrics: dict[str, Any]   # {"i2i": {...}, "t2i": {...}, "queries": N, "draws": D}
    cmc: np.ndarray           # image-to-image CMC, averaged over draws
    examples: list[dict[str, Any]] = field(default_factory=list)  # ranked lists for the report


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


def _cameras(rows) -> np.ndarray | None:
    cams = rows["camera"].to_numpy()
    return cams if (cams >= 0).all() else None  # unknown cameras: nothing is filtered


def evaluate(clip: ClipModel, data: PreparedData, params: EvalParams,
             device: str | torch.device = "cpu", examples: int = 4, top_k: int = 5
             ) -> EvalResult | None:
    """Embed every test image once, then score each draw.

    ``examples`` queries of the first draw keep their ``top_k`` ranked gallery images. In a
    process group the ranks share the embedding, rank 0 scores; the others return ``None``.
    """
    test = data.table[data.table["split"].isin(["query", "gallery"])]
    images = sorted(test["image"].unique())
    if not images:
        raise ValueError(f"{data.root / 'manifest.csv'}: no query or gallery images")
    position = {image: i for i, image in enumerate(images)}
    device = torch.device(device)
    dtype = resolve_precision(params.precision, device, "eval.precision")
    feats = image_features(clip.model, [data.root / p for p in images], clip.preprocess_val,
                           batch_size=params.batch_size, workers=params.workers, flip=params.flip,
                           device=device, dtype=dtype, shard=True)
    if feats is None:
        return None
    feats = feats.numpy()
    query_images = sorted(test.loc[test["split"] == "query", "image"].unique())
    captions = data.captions(test[test["image"].isin(query_images)].drop_duplicates("image"))
    caption_of = dict(zip(query_images, captions, strict=True)) if data.texts else {}
    text_feats = {}
    if caption_of and hasattr(clip.model, "encode_text"):
        unique = sorted(set(caption_of.values()))
        encoded = text_features(clip.model, clip.tokenizer, unique, batch_size=params.batch_size,
                                device=device, dtype=dtype).numpy()
        text_feats = dict(zip(unique, encoded, strict=True))

    per_draw, cmcs, ranked = [], [], []
    for draw in data.draws:
        q, g = data.rows("query", draw), data.rows("gallery", draw)
        qf = feats[[position[p] for p in q["image"]]]
        gf = feats[[position[p] for p in g["image"]]]
        dist = 1.0 - qf @ gf.T
        if params.rerank:
            dist = k_reciprocal_rerank(dist, 1.0 - qf @ qf.T, 1.0 - gf @ gf.T, k1=params.rerank_k1,
                                       k2=params.rerank_k2, lambda_value=params.rerank_lambda)
        q_ids, g_ids = q["item_id"].to_numpy(), g["item_id"].to_numpy()
        cmc, mean_ap = evaluate_rank(dist, q_ids, g_ids, _cameras(q), _cameras(g),
                                     max_rank=params.max_rank)
        i2i = summarise(cmc, mean_ap)
        i2i.update(recall_at_k(dist, q_ids, g_ids, ks=(1, 10, 20)))
        result: dict[str, Any] = {"i2i": i2i, "queries": len(q), "gallery": len(g)}
        if text_feats:
            tf = np.stack([text_feats[caption_of[p]] for p in q["image"]])
            result["t2i"] = text_to_image(tf @ gf.T, q_ids, g_ids)
        per_draw.append(result)
        cmcs.append(cmc)
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
    return EvalResult(metrics, np.mean([c[:length] for c in cmcs], axis=0), ranked)


def write_results(result: EvalResult, metrics_path: Path, cmc_path: Path,
                  extra: dict[str, Any] | None = None, examples_path: Path | None = None) -> None:
    """``metrics/<stage>.json``, the CMC curve as a DVC plot file and the ranked examples."""
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    content = {**result.metrics, **(extra or {})}
    metrics_path.write_text(json.dumps(_rounded(content), indent=2) + "\n", encoding="utf-8")
    cmc_path.parent.mkdir(parents=True, exist_ok=True)
    curve = [{"rank": i + 1, "cmc": round(float(v), 6)} for i, v in enumerate(result.cmc)]
    cmc_path.write_text(json.dumps(curve, indent=1) + "\n", encoding="utf-8")
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
