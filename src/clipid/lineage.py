"""Lineage: which MLflow run, experiment, DVC experiment and commit made a checkpoint.

Checkpoints carry no run id (a DVC output must be the same bytes on every rebuild), so the link
goes the other way: every training run tags the SHA-256 of the weights it wrote and of its
parent (:func:`checkpoint_tags`), and ``clipid lineage`` looks the hash up in the store, then
the parent's, back to the pretrained model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipid.config import Params
from clipid.errors import ClipidError
from clipid.files import file_sha256, sidecar_path
from clipid.stage_registry import PRETRAINED, get_stage
from clipid.tracking_spool import CHECKPOINT_TAG, format_time
from clipid.workspace import Workspace

__all__ = ["checkpoint_tags", "lineage_lines", "pretrained_lines", "resolve_checkpoint"]

PARENT_TAG = "clipid.parent.sha256"


def checkpoint_tags(checkpoint: Path) -> dict[str, str]:
    """The tags that tie a training run to its weights: their SHA-256 and path, and the
    parent's SHA-256 (the checkpoint it started from; none for pretrained weights)."""
    meta = json.loads(sidecar_path(checkpoint).read_text(encoding="utf-8"))
    init = _mapping(meta.get("init_model"))                     # CLIP-ReID's prompts
    tags = {CHECKPOINT_TAG: file_sha256(checkpoint), "clipid.checkpoint.path": str(checkpoint),
            "clipid.parent": str(meta.get("parent") or init.get("weights") or "")}
    parent = meta.get("parent_sha256") or init.get("sha256")
    if parent:
        tags[PARENT_TAG] = parent
    prompts = _mapping(meta.get("prompts")).get("sha256")       # CLIP-ReID's image stage
    if prompts:
        tags["clipid.prompts.sha256"] = prompts
    return {k: v for k, v in tags.items() if v}


def _mapping(value: Any) -> dict[str, Any]:
    """A sidecar entry that is a mapping in one stage's sidecar and a string in another's
    (``prompts``: the prompt kind in the prompts' sidecar, the prompts' file in the image's)."""
    return value if isinstance(value, dict) else {}


def resolve_checkpoint(target: str | Path, workspace: Workspace | None = None) -> Path:
    """A checkpoint file, a folder holding one, or a stage name (``stage2``: models/stage2)."""
    workspace = workspace or Workspace()
    path = Path(target)
    if not path.exists() and "/" not in str(target):
        path = workspace.stage_dir(str(target))
    if path.is_dir():
        found = sorted(p for p in path.glob("*.safetensors") if sidecar_path(p).is_file())
        if len(found) != 1:
            raise ClipidError(f"{path}: expected one checkpoint (*.safetensors with its .json "
                              f"sidecar), found {len(found)}")
        path = found[0]
    if not path.is_file():
        raise ClipidError(f"{target}: no such checkpoint, folder or stage under "
                          f"{workspace.models}")
    if path.suffix != ".safetensors" or not sidecar_path(path).is_file():
        raise ClipidError(f"{path}: not a clipid checkpoint (.safetensors with a .json sidecar)")
    return path


def _describe(run: Any, experiments: dict[str, str], indent: str) -> list[str]:
    tags = run.data.tags
    baseline = tags.get("dvc.exp_baseline_rev")
    return [
        f"{indent}run         {run.info.run_id} ({run.info.run_name}, {run.info.status}, "
        f"started {format_time(run.info.start_time)})",
        f"{indent}experiment  {experiments.get(run.info.experiment_id, '?')} "
        f"(id {run.info.experiment_id})",
        f"{indent}dvc exp     {tags.get('dvc.exp_name') or '- (not a dvc exp run)'}"
        f"{'  baseline ' + baseline if baseline else ''}",
        f"{indent}commit      {tags.get('git.commit') or '-'}",
        f"{indent}stage       {tags.get('dvc.stage') or tags.get('clipid.stage', '-')}",
    ]


def lineage_lines(client: Any, sha256: str, label: str,
                  pending: list[Any] = ()) -> tuple[list[str], bool]:
    """What ``clipid lineage`` prints for weights of ``sha256``, then for their parents; and
    whether the store knew the weights. ``pending``: spooled records not yet in the store."""
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    lines: list[str] = []
    found, seen, indent = False, set(), ""
    while sha256 and sha256 not in seen:
        seen.add(sha256)
        runs = client.search_runs(list(experiments), f"tags.`{CHECKPOINT_TAG}` = '{sha256}'",
                                  order_by=["attributes.start_time DESC"])
        lines.append(f"{indent}{label}  sha256 {sha256}")
        spooled = [r for r in pending if r.tags.get(CHECKPOINT_TAG) == sha256]
        for record in spooled:
            lines.append(f"{indent}  spooled     {record.run_name} (dvc exp "
                         f"{record.tags.get('dvc.exp_name') or '-'}, commit "
                         f"{record.tags.get('git.commit') or '-'}): not in the store yet; "
                         "`clipid tracking sync` replays it")
        if not runs:
            if not spooled:
                lines.append(f"{indent}  no run in the store wrote these weights")
            break
        found = found or not indent
        for number, run in enumerate(runs):
            if number == 1:
                lines.append(f"{indent}  the same weights, also from:")
            lines += _describe(run, experiments, indent + "  ")
        tags = runs[0].data.tags
        sha256 = tags.get(PARENT_TAG, "")
        label = f"parent {tags.get('clipid.parent', '?')}"
        if not sha256:
            lines.append(f"{indent}parent {tags.get('clipid.parent') or PRETRAINED} "
                         "(not a checkpoint: the start of the line)")
        indent += "  "
    return lines, found


def pretrained_lines(client: Any, params: Params) -> tuple[list[str], bool]:
    """What ``clipid lineage stage1`` prints: Stage 1 has no checkpoint of its own (it is
    ``model.name`` with ``model.pretrained``), so its line is the params and the runs of its
    evaluation with that model, newest first; and whether the store has such a run."""
    model = params.model
    weights = model.pretrained or "random"
    said = (f"random weights (seed {params.train.seed})" if not model.pretrained
            else f"model.pretrained {model.pretrained}")
    lines = [f"{PRETRAINED}  {model.name}, {said}: no checkpoint of its own, the start of every "
             "line"]
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    query = (f"tags.`clipid.stage` = '{get_stage(PRETRAINED).evaluated_by}' and "
             f"tags.`model.name` = '{model.name}' and tags.`model.pretrained` = '{weights}'")
    runs = client.search_runs(list(experiments), query, order_by=["attributes.start_time DESC"])
    if not runs:
        lines.append(f"  no run in the store evaluated {model.name} with {weights} weights")
    for run in runs:
        lines += _describe(run, experiments, "  ")
    return lines, bool(runs)
