"""Stage ``clipreid_prompts``: CLIP-ReID's prompt learning, one MLflow run per execution.

The second CLIP-ReID stage, ``clipreid_image``, is the training engine on the registry entry
``clipreid``, whose ``extra_terms`` add the prompts' image-to-text term (``clipid train
clipreid``; see :func:`clipid.training.prompts.prompt_terms`).
"""

from __future__ import annotations

from clipid.config import Params
from clipid.runtime import setup_runtime, teardown_runtime
from clipid.tracking import Tracker
from clipid.training.prompts import PROMPTS_STAGE, PromptResult, learn_prompts
from clipid.workspace import Workspace


def prompts_stage(params: Params, workspace: Workspace | None = None) -> PromptResult:
    device = setup_runtime(params.runtime)
    try:
        with Tracker(stage=PROMPTS_STAGE, params=params, run_name=PROMPTS_STAGE) as tracker:
            result = learn_prompts(
                params, device=device, workspace=workspace,
                on_log=lambda metrics, step: tracker.log_metrics(metrics, step=step))
            tracker.log_checkpoint(result.checkpoint, result.seconds)
    finally:
        teardown_runtime()
    return result
