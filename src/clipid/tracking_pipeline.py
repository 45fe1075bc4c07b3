"""One MLflow parent run per pipeline execution, and the params each stage reads.

A pipeline execution is a DVC experiment (``DVC_EXP_NAME``, set by ``dvc exp run`` and queued
experiments) or, for a plain ``dvc repro``, the commit (plus a digest of ``params.yaml`` and
``dvc.yaml`` when they differ from it). Its key is the tag ``clipid.pipeline`` of a parent run;
every stage's run is nested under it (``mlflow.parentRunId``) and named ``<label>/<stage>``, so
two experiments' ``stage2`` runs differ in the UI's table. The parent is found or created by its
key, so every stage of one execution, the final reconciliation and a spool replay agree on it.

This module imports neither MLflow nor :mod:`clipid.tracking` (the spool uses it on replay).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

__all__ = ["PARENT_TAG", "PIPELINE_TAG", "ROLE_TAG", "Pipeline", "current_pipeline", "git_output",
           "ensure_parent", "stage_params"]

PIPELINE_TAG = "clipid.pipeline"    # the key of the execution, on the parent and its children
ROLE_TAG = "clipid.role"            # "pipeline" on the parent run
PARENT_TAG = "mlflow.parentRunId"   # what MLflow's UI nests runs by
_FILES = ("params.yaml", "dvc.yaml")


@dataclass(frozen=True)
class Pipeline:
    key: str                        # unique: the tag clipid.pipeline
    label: str                      # short, for run names: experiment name or short commit
    tags: dict[str, str]            # what the parent run carries besides key and role

    def run_name(self, stage: str) -> str:
        return f"{self.label}/{stage}"


def git_output(root: Path, *args: str) -> str | None:
    """What ``git *args`` prints in ``root``, stripped; None when it fails."""
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _uncommitted_digest(root: Path) -> str | None:
    """A digest of params.yaml and dvc.yaml when either differs from the commit."""
    if not git_output(root, "status", "--porcelain", "--", *_FILES):
        return None
    digest = hashlib.sha256()
    for name in _FILES:
        path = root / name
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()[:8]


def current_pipeline(root: Path) -> Pipeline | None:
    """The execution this process belongs to (``root``: the DVC workspace, where the store is);
    None outside a DVC experiment and a git repository (a stage run by hand in a folder, the
    unit tests' stores): its runs then stand alone."""
    commit = git_output(root, "rev-parse", "HEAD")
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
    tags = {k: v for k, v in (("dvc.exp_name", exp_name), ("dvc.exp_baseline_rev", baseline),
                              ("git.commit", commit or "")) if v}
    if exp_name:
        return Pipeline(f"exp:{exp_name}:{baseline or commit or ''}", exp_name, tags)
    if not commit:
        return None
    dirty = _uncommitted_digest(root)
    key = f"repro:{commit}" + (f"+{dirty}" if dirty else "")
    return Pipeline(key, commit[:7] + (f"+{dirty}" if dirty else ""), tags)


def ensure_parent(client: Any, experiment_id: str, key: str, label: str,
                  tags: dict[str, str], start_time: int | None = None) -> str:
    """The parent run of the execution ``key``: found by its tag, else created (FINISHED at
    once: a parent groups runs, it runs nothing; its end time follows its last child)."""
    query = f"tags.`{PIPELINE_TAG}` = '{key}' and tags.`{ROLE_TAG}` = 'pipeline'"
    found = client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=label, start_time=start_time,
                            tags={**tags, PIPELINE_TAG: key, ROLE_TAG: "pipeline"})
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def stage_params(flat: dict[str, Any], dvc_stage: str, root: Path) -> dict[str, Any]:
    """The entries of ``flat`` (flattened params) that ``dvc_stage`` lists under ``params:`` in
    ``root``'s dvc.yaml (``evaluate@stage2`` is the foreach stage ``evaluate``); all of them
    when there is no dvc.yaml or no such stage (a stage run by hand)."""
    keys = _dvc_params(root, dvc_stage.split("@", 1)[0])
    if keys is None:
        return dict(flat)
    return {k: v for k, v in flat.items()
            if any(k == p or k.startswith(p + ".") for p in keys)}


def _dvc_params(root: Path, name: str) -> list[str] | None:
    path = root / "dvc.yaml"
    if not path.is_file():
        return None
    stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages") or {}
    stage = stages.get(name)
    if not isinstance(stage, dict):
        return None
    stage = stage.get("do", stage)  # a foreach stage's body
    keys: list[str] = []
    for entry in stage.get("params") or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):  # {params.yaml: [keys]} (another file's keys: none here)
            keys += [k for k in entry.get("params.yaml") or [] if isinstance(k, str)]
    return keys
