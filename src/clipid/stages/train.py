"""Stages ``train_stage2`` ... ``train_stage4`` and ``clipreid_image`` (``clipid train clipreid``:
the engine with CLIP-ReID's prompts as an extra loss term): one MLflow run per execution.

With ``train.nproc`` above 1, ``clipid train`` starts itself again under torchrun
(:func:`clipid.stages.launch.launch_cli`); every process then trains its shard, and rank 0
alone writes the checkpoint and the MLflow run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from clipid.config import Params
from clipid.errors import ClipidError
from clipid.runtime import is_main_process, setup_runtime, teardown_runtime
from clipid.stages.launch import launch_cli
from clipid.tracking import Tracker
from clipid.training.engine import Trainer, TrainResult
from clipid.training.prompts import IMAGE_STAGE, image_stage_spec, load_text_classifier

log = logging.getLogger(__name__)


def train_stage(params: Params, stage: str, prepared: Path = Path("data/prepared"),
                models_dir: Path = Path("models")) -> TrainResult:
    device = setup_runtime(params.runtime)
    clipreid = stage == IMAGE_STAGE  # CLIP-ReID's image stage: the engine plus its prompts
    try:
        with Tracker(stage="clipreid_image" if clipreid else f"train_{stage}", params=params,
                     run_name=stage, enabled=is_main_process()) as tracker:
            extra: dict = {}
            if clipreid:
                classifier, metadata = load_text_classifier(params, device, prepared, models_dir)
                extra = {"spec": image_stage_spec(params),
                         "text_classifier": classifier, "metadata": metadata}
            trainer = Trainer(params, stage, device=device, prepared=prepared,
                              models_dir=models_dir,
                              on_log=lambda metrics, step: tracker.log_metrics(metrics, step=step),
                              **extra)
            result = trainer.fit()
            tracker.log_checkpoint(result.checkpoint, result.seconds)
    finally:
        teardown_runtime()
    return result


def launch(params: Params, stage: str, params_path: Path) -> None:
    if params.train.batch_size % params.train.nproc:
        raise ClipidError(f"train.batch_size ({params.train.batch_size}) must be a multiple of "
                          f"train.nproc ({params.train.nproc})")
    # DDP's results match one process's to rounding anyway: share the cores among the ranks.
    launch_cli(params, ["train", stage], params_path,
               threads=max(1, (os.cpu_count() or 1) // params.train.nproc))
