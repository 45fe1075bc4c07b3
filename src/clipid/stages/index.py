"""Stage ``index``: embed the gallery with each model that ``search.model`` names (the image
model and the text model) into ``models/index/<model>/`` for ``clipid search``.

``metrics/index.json`` records per model the gallery size and, for the faiss backend, recall@10
of the approximate index against exact search on the gallery itself. The build time goes to
MLflow only (``index/<model>/build_seconds``): a DVC output must not change between reruns.
"""

from __future__ import annotations

import json
import logging
import time

from clipid.config import Params
from clipid.data.dataset import PreparedData
from clipid.models.stages import model_for_stage
from clipid.runtime import is_main_process, setup_runtime, teardown_runtime
from clipid.search.gallery import GalleryIndex
from clipid.search.index import FaissIndex, recall_against_exact
from clipid.stage_metrics import index_metrics
from clipid.tracking import Tracker
from clipid.workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["index_stage"]


def index_stage(params: Params, workspace: Workspace | None = None) -> dict[str, dict]:
    workspace = workspace or Workspace()
    metrics_path = workspace.index_metrics
    device = setup_runtime(params.runtime)
    try:
        built = _build_all(params, workspace, device)
    finally:
        teardown_runtime()  # under torchrun: every rank has embedded its share
    if built is None:  # not rank 0: rank 0 writes the indexes and the metrics
        return {}
    summary, seconds = built
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n",
                            encoding="utf-8")
    with Tracker(stage="index", params=params, run_name="index") as tracker:
        tracker.log_metrics(index_metrics(summary))
        tracker.log_metrics({f"index/{m}/build_seconds": s for m, s in seconds.items()})
        tracker.log_artifact(metrics_path, "index")
    return summary


def _build_all(params: Params, workspace: Workspace, device
               ) -> tuple[dict[str, dict], dict[str, float]] | None:
    """Each model's gallery index, written by rank 0: ``(summary, build seconds)`` per model
    (``None`` on the other ranks)."""
    data = PreparedData.load(workspace.prepared, with_texts=False)
    models = dict.fromkeys([params.search.model.image, params.search.model.text])
    summary: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for model in models:
        clip = model_for_stage(params, model, device, workspace)
        start = time.perf_counter()
        gallery = GalleryIndex.build(clip, model, data, params.eval, params.search.backend,
                                     params.search.faiss, device=device, seed=params.train.seed)
        if gallery is None:
            continue
        gallery.save(workspace.index_dir(model))
        entry = {"images": len(gallery.table), "dim": gallery.info["dim"],
                 "backend": params.search.backend}
        seconds[model] = time.perf_counter() - start
        if isinstance(gallery.index, FaissIndex):
            entry["recall_at_10"] = round(recall_against_exact(
                gallery.index, gallery.embeddings, seed=params.train.seed), 4)
        summary[model] = entry
        log.info("index %s: %s", model, entry)
    return (summary, seconds) if is_main_process() else None
