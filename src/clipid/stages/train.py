"""Stages ``train_stage2`` ... ``train_stage4`` and ``clipreid_image`` (``clipid train <stage>``):
the training engine on a registry entry's description, one MLflow run per execution. What
differs between stages (CLIP-ReID's prompt term included) comes from the stage registry.

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
from clipid.stage_registry import get_stage
from clipid.stages.launch import launch_cli
from clipid.tracking import Tracker
from clipid.training.engine import Trainer, TrainResult
from clipid.workspace import Workspace

log = logging.getLogger(__name__)


def train_stage(params: Params, stage: str, workspace: Workspace | None = None) -> TrainResult:
    device = setup_runtime(params.runtime)
    try:
        with Tracker(stage=get_stage(stage).dvc_stage, params=params, run_name=stage,
                     enabled=is_main_process()) as tracker:
            trainer = Trainer(params, stage, device=device, workspace=workspace,
                              on_log=lambda metrics, step: tracker.log_metrics(metrics, step=step))
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
