"""Stages ``train_stage2`` ... ``train_stage4``: one engine, one MLflow run per execution."""

from __future__ import annotations

import logging
from pathlib import Path

from clipid.config import Params
from clipid.runtime import setup_runtime
from clipid.tracking import Tracker
from clipid.training.engine import Trainer, TrainResult

log = logging.getLogger(__name__)


def train_stage(params: Params, stage: str, prepared: Path = Path("data/prepared"),
                models_dir: Path = Path("models")) -> TrainResult:
    device = setup_runtime(params.runtime)
    with Tracker(stage=f"train_{stage}", params=params, run_name=stage) as tracker:
        trainer = Trainer(params, stage, device=device, prepared=prepared, models_dir=models_dir,
                          on_log=lambda metrics, step: tracker.log_metrics(metrics, step=step),
                          run_id=tracker.run_id)
        result = trainer.fit()
        tracker.log_metrics({"train_seconds": result.seconds})
        if params.mlflow.log_checkpoints:
            tracker.log_artifact(result.checkpoint, "checkpoint")
        tracker.log_artifact(result.checkpoint.with_suffix(".json"), "checkpoint")
    return result
