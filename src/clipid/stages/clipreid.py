"""Stage ``clipreid_prompts``: CLIP-ReID's prompt learning, one MLflow run per execution.

The second CLIP-ReID stage, ``clipreid_image``, is the training engine specialised: ``clipid
train clipreid`` (see :func:`clipid.stages.train.train_stage` and
:func:`clipid.training.prompts.load_text_classifier`).
"""

from __future__ import annotations

from pathlib import Path

from clipid.config import Params
from clipid.runtime import setup_runtime, teardown_runtime
from clipid.tracking import Tracker
from clipid.training.prompts import PROMPTS_STAGE, PromptResult, learn_prompts


def prompts_stage(params: Params, prepared: Path = Path("data/prepared"),
                  models_dir: Path = Path("models")) -> PromptResult:
    device = setup_runtime(params.runtime)
    try:
        with Tracker(stage=PROMPTS_STAGE, params=params, run_name=PROMPTS_STAGE) as tracker:
            result = learn_prompts(
                params, device=device, prepared=prepared, models_dir=models_dir,
                on_log=lambda metrics, step: tracker.log_metrics(metrics, step=step))
            tracker.log_checkpoint(result.checkpoint, result.seconds)
    finally:
        teardown_runtime()
    return result
