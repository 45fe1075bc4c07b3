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
from clipid.runtime import setup_runtime, teardown_runtime
from clipid.tracking import Tracker

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
                   ) -> EvalResult | None:
    """Evaluate one stage's model and log the figures to MLflow.

    A trained model's figures go into the MLflow run that trained it (found by the SHA-256 of
    the checkpoint); Stage 1 has no training run, so it gets a run of its own. The evaluation
    time goes to MLflow only: metrics/ are DVC outputs and must not change between reruns.
    """
    device = setup_runtime(params.runtime)
    try:
        clip = model_for_stage(params, stage, device, models_dir)
        data = PreparedData.load(prepared)
        start = time.perf_counter()
        result = evaluate(clip, data, params.eval, device=device)
        seconds = time.perf_counter() - start
    finally:
        teardown_runtime()  # under torchrun: every rank has embedded its share
    if result is None:  # not rank 0: rank 0 scores and writes
        return None
    extra = {"model": {"architecture": clip.architecture, "weights": clip.weights}}
    metrics_path = metrics_dir / f"{stage}.json"
    cmc_path = metrics_dir / "cmc" / f"{stage}.json"
    examples_path = metrics_dir / "examples" / f"{stage}.json"
    write_results(result, metrics_path, cmc_path, extra, examples_path)
    i2i, t2i = result.metrics["i2i"], result.metrics.get("t2i", {})
    log.info("%s: i2i R1 %.4f mAP %.4f | t2i R1 %.4f mAP %.4f", stage, i2i["R1"],
             i2i["mAP"], t2i.get("R1", float("nan")), t2i.get("mAP", float("nan")))

    dvc_stage = "zeroshot" if stage == PRETRAINED_STAGE else f"evaluate@{stage}"
    checkpoint = None if stage == PRETRAINED_STAGE else checkpoint_path(stage, models_dir)
    with Tracker(stage=dvc_stage, params=params, run_name=stage,
                 checkpoint=checkpoint) as tracker:
        tracker.log_metrics({**eval_metrics(result.metrics), "eval_seconds": seconds})
        if stage == PRETRAINED_STAGE:  # trained stages logged theirs when training
            tracker.log_model(clip, stage)
        # Three files of one name: in one folder each would overwrite the one before.
        for path, folder in ((metrics_path, "eval"), (cmc_path, "eval/cmc"),
                             (examples_path, "eval/examples")):
            tracker.log_artifact(path, folder)
    return result


def eval_metrics(metrics: dict) -> dict[str, float]:
    """``{"eval/i2i/mAP": ..., "eval/t2i/R1": ...}``: the flat numeric form MLflow takes."""
    flat: dict[str, float] = {}
    for block in ("i2i", "t2i"):
        for key, value in metrics.get(block, {}).items():
            flat[f"eval/{block}/{key}"] = float(value)
    flat["eval/queries"] = float(metrics["queries"])
    return flat
