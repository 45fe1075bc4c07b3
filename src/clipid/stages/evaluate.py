"""Stage ``evaluate`` (``evaluate_stage1`` and ``evaluate@<stage>`` in dvc.yaml): the shared
evaluation of one model stage.

Stage 1 is the pretrained model as ``model.name``/``model.pretrained`` give it; every later stage
is read from its checkpoint ``models/<stage>/model.safetensors`` (see
:func:`clipid.models.stages.model_for_stage`).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from clipid.config import Params
from clipid.data.dataset import PreparedData
from clipid.evaluation import EvalResult, evaluate, write_results
from clipid.lineage import checkpoint_tags
from clipid.models.stages import model_for_stage
from clipid.runtime import setup_runtime, teardown_runtime
from clipid.stage_metrics import eval_metrics
from clipid.stage_registry import get_stage
from clipid.tracking import Tracker
from clipid.workspace import Workspace

log = logging.getLogger(__name__)


def evaluate_stage(params: Params, stage: str, workspace: Workspace | None = None
                   ) -> EvalResult | None:
    """Evaluate one stage's model and log the figures to MLflow.

    A trained model's figures go into the MLflow run that trained it (found by the SHA-256 of
    the checkpoint); Stage 1 has no training run, so it gets a run of its own. The evaluation
    time goes to MLflow only: metrics/ are DVC outputs and must not change between reruns.
    """
    workspace = workspace or Workspace()
    pretrained = get_stage(stage).is_pretrained
    device = setup_runtime(params.runtime)
    try:
        clip = model_for_stage(params, stage, device, workspace)
        data = PreparedData.load(workspace.prepared)
        start = time.perf_counter()
        # eval.ranks: auto means what the data source's papers print.
        ranks = list(params.eval.reported_ranks(params.data.source))
        result = evaluate(clip, data, dataclasses.replace(params.eval, ranks=ranks),
                          device=device)
        seconds = time.perf_counter() - start
    finally:
        teardown_runtime()  # under torchrun: every rank has embedded its share
    if result is None:  # not rank 0: rank 0 scores and writes
        return None
    extra = {"model": {"architecture": clip.architecture, "weights": clip.weights}}
    metrics_path = workspace.stage_metrics(stage)
    cmc_path = workspace.stage_cmc(stage)
    examples_path = workspace.stage_examples(stage)
    roc_path = workspace.stage_roc(stage)
    write_results(result, metrics_path, cmc_path, extra, examples_path, roc_path)
    i2i, t2i = result.metrics["i2i"], result.metrics.get("t2i", {})
    log.info("%s: i2i R1 %.4f mAP %.4f | t2i R1 %.4f mAP %.4f", stage, i2i["R1"],
             i2i["mAP"], t2i.get("R1", float("nan")), t2i.get("mAP", float("nan")))

    with _tracker(params, stage, workspace) as tracker:
        tracker.log_metrics({**eval_metrics(result.metrics), "eval_seconds": seconds})
        if pretrained:  # trained stages logged theirs when training
            tracker.log_model(clip, stage)
        # Four files of one name: in one folder each would overwrite the one before.
        for path, folder in ((metrics_path, "eval"), (cmc_path, "eval/cmc"),
                             (roc_path, "eval/roc"), (examples_path, "eval/examples")):
            tracker.log_artifact(path, folder)
    return result


def _tracker(params: Params, stage: str, workspace: Workspace) -> Tracker:
    """Stage 1's run, or the run of this pipeline execution that trained the model (found by
    its weights' SHA-256). When DVC did not train it here (restored from its cache), the
    evaluation starts that stage's run: the training stage's tags and params, with the
    weights' hashes, which `clipid track` then completes."""
    info = get_stage(stage)
    if info.is_pretrained:
        return Tracker(stage=info.evaluated_by, params=params, run_name=stage)
    checkpoint = workspace.weights(stage)
    return Tracker(stage=info.dvc_stage, params=params, run_name=stage, checkpoint=checkpoint,
                   param_stages=(info.dvc_stage, info.evaluated_by),
                   tags={"clipid.eval_stage": info.evaluated_by, **checkpoint_tags(checkpoint)})
