"""Stages ``zeroshot`` (Stage 1) and ``evaluate``: the shared evaluation of one model.

Stage 1 is the pretrained model as ``model.name``/``model.pretrained`` give it; every later stage
is read from its checkpoint ``models/<stage>/model.safetensors``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from clipid.config import Params
from clipid.data.dataset import PreparedData
from clipid.evaluation import EvalResult, evaluate, write_results
from clipid.models.factory import ClipModel, create_model, load_model
from clipid.runtime import setup_runtime

log = logging.getLogger(__name__)

PRETRAINED_STAGE = "stage1"


def checkpoint_path(stage: str, models_dir: Path = Path("models")) -> Path:
    return models_dir / stage / "model.safetensors"


def model_for_stage(params: Params, stage: str, device, models_dir: Path = Path("models")
                    ) -> ClipModel:
    if stage == PRETRAINED_STAGE:
        return create_model(params.model.name, params.model.pretrained, seed=params.train.seed,
                            device=device)
    return load_model(checkpoint_path(stage, models_dir), device=device)


def evaluate_stage(params: Params, stage: str, prepared: Path = Path("data/prepared"),
                   metrics_dir: Path = Path("metrics"), models_dir: Path = Path("models")
                   ) -> EvalResult:
    device = setup_runtime(params.runtime)
    clip = model_for_stage(params, stage, device, models_dir)
    data = PreparedData.load(prepared)
    start = time.perf_counter()
    result = evaluate(clip, data, params.eval, device=device)
    extra = {"model": {"architecture": clip.architecture, "weights": clip.weights},
             "eval_seconds": round(time.perf_counter() - start, 1)}
    write_results(result, metrics_dir / f"{stage}.json", metrics_dir / "cmc" / f"{stage}.json",
                  extra)
    i2i, t2i = result.metrics["i2i"], result.metrics.get("t2i", {})
    log.info("%s: i2i rank1 %.4f mAP %.4f | t2i R@1 %.4f mAP %.4f", stage, i2i["rank1"],
             i2i["mAP"], t2i.get("R1", float("nan")), t2i.get("mAP", float("nan")))
    return result
