"""``clipid track`` (the DVC stage ``track``, last, run on every repro): MLflow made the complete
view of what DVC built, whatever DVC ran, skipped or restored from its run-cache.

DVC's outputs are the truth. :func:`snapshot` reads them into a :class:`Snapshot`: for the
pipeline execution (:mod:`clipid.tracking_pipeline`), one run per model stage (found by its
weights' SHA-256 tag within the execution) with the params its DVC stage reads and the metrics
of ``metrics/<stage>.json``, Stage 1's run, the report's and the index's runs, and the champion
stages of ``metrics/register.json``. :func:`reconcile` makes the store hold exactly that: it
creates what is missing (a run DVC restored instead of running is tagged ``clipid.restored``),
adds what a run lacks, registers weights no version holds yet (one version per distinct
weights), and points the pipeline's alias (``champion`` or its candidate alias, by the champion
policy: :mod:`clipid.deploy.promotion`) at ``register.json``'s stages. What is there already is
left alone, so a second ``dvc repro`` with nothing to do adds no run and no version.

When the store cannot be reached, the snapshot goes to the spool
(``.clipid/spool/pipelines/<id>.json``), its files and checkpoints kept by content like a spooled
run's (:func:`clipid.tracking_spool.keep_artifacts`: DVC deletes a temporary experiment's
workspace), and is reconciled after the spooled runs are replayed, by the next stage that
reaches the store or by ``clipid tracking sync`` (its alias decided for the store it goes to).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipid.config import Params, flatten_params, params_from_dict
from clipid.deploy import CHAMPION
from clipid.deploy.promotion import git_branch, promotion_alias
from clipid.deploy.registry import SHA_TAG, drop_duplicate_versions, registered_versions
from clipid.files import file_sha256, sidecar_path
from clipid.lineage import checkpoint_tags
from clipid.stage_metrics import eval_metrics, index_metrics
from clipid.stage_registry import STAGES, StageInfo
from clipid.tracking_pipeline import (
    PARENT_TAG,
    PIPELINE_TAG,
    current_pipeline,
    ensure_parent,
    stage_params,
)
from clipid.tracking_spool import (
    CHECKPOINT_TAG,
    MISSING_TAG,
    PIPELINE_LABEL_TAG,
    keep_artifacts,
    kept_file,
    now_ms,
    spool_dir,
)
from clipid.workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["RESTORED_TAG", "RunView", "Snapshot", "pending", "reconcile", "snapshot",
           "write_spooled"]

RESTORED_TAG = "clipid.restored"   # on a run `clipid track` made for a stage DVC did not run


@dataclass
class RunView:
    """What one run of the execution holds, read from DVC's outputs."""

    stage: str                                  # tag clipid.stage: the DVC stage
    name: str                                   # run name after the execution's label
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)   # path, artifact_path, sha256, copy
    model: str | None = None                    # "checkpoint" or "pretrained": register it
    checkpoint: str | None = None               # the weights' path ("checkpoint" models)
    checkpoint_copy: str | None = None          # ... kept in the spool, with its sidecar

    def add_artifact(self, path: Path, artifact_path: str) -> None:
        if path.is_file():
            self.artifacts.append({"path": str(path.resolve()), "artifact_path": artifact_path,
                                   "sha256": file_sha256(path), "copy": None})

    @property
    def weights(self) -> dict[str, Any]:
        """The checkpoint in the form of a spooled artifact (path, SHA-256, kept copy)."""
        return {"path": self.checkpoint or "", "artifact_path": "checkpoint", "model": self.name,
                "sha256": self.tags.get(CHECKPOINT_TAG, ""), "copy": self.checkpoint_copy}


@dataclass
class Snapshot:
    """The execution's complete view; JSON-serialisable for the spool."""

    uri: str
    experiment: str
    artifact_location: str | None
    key: str                                    # the parent run's clipid.pipeline
    label: str
    parent_tags: dict[str, str]
    params_yaml: dict[str, Any]                 # the params (Stage 1's model is rebuilt)
    runs: list[RunView] = field(default_factory=list)
    champions: dict[str, str] = field(default_factory=dict)   # registered model -> stage
    branch: str | None = None                   # git's, for the champion policy
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=now_ms)

    def alias(self) -> str:
        """The alias its champions get (:mod:`clipid.deploy.promotion`), by the params, the
        branch and experiment it ran on, and the store this process writes."""
        mlflow = params_from_dict(self.params_yaml, source="params.yaml").mlflow
        return promotion_alias(mlflow, self.parent_tags.get("dvc.exp_name", ""), self.branch,
                               self.parent_tags.get("git.commit", ""))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        data = dict(data)
        data["runs"] = [RunView(**view) for view in data["runs"]]
        return cls(**data)


# -------------------------------------------------------------------------------------------
# DVC's outputs -> Snapshot


def snapshot(params: Params, raw_params: dict[str, Any], workspace: Workspace | None = None
             ) -> Snapshot | None:
    """The view of the workspace's outputs; None outside a git repository (no execution)."""
    from clipid import tracking

    workspace = workspace or Workspace()
    root = tracking.store_root()
    pipeline = current_pipeline(root)
    if pipeline is None:
        return None
    flat = {k: str(v) for k, v in flatten_params(params).items()}
    snap = Snapshot(
        uri=tracking.tracking_uri(root),
        experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME") or tracking.EXPERIMENT,
        artifact_location=tracking.own_artifact_location(root), key=pipeline.key,
        label=pipeline.label, parent_tags=tracking.pipeline_tags(pipeline),
        params_yaml=raw_params, branch=git_branch(root))
    for info in STAGES.values():
        view = _stage_view(info, flat, params, workspace, root)
        if view is not None:
            snap.runs.append(view)
    snap.runs += _summary_views(flat, workspace, root)
    if workspace.register_metrics.is_file():
        chosen = json.loads(workspace.register_metrics.read_text(encoding="utf-8"))
        snap.champions = {model: block["stage"] for model, block in chosen.items()}
    return snap


def _stage_view(info: StageInfo, flat: dict[str, str], params: Params, workspace: Workspace,
                root: Path) -> RunView | None:
    """A model stage's run: its DVC stage's params (and its evaluation's), its checkpoint's
    hashes, the evaluation's metrics; None when DVC holds nothing of it."""
    metrics_path = workspace.stage_metrics(info.name)
    stages = (info.dvc_stage,) if info.is_pretrained or not info.has_model \
        else (info.dvc_stage, info.evaluated_by)
    view = RunView(info.dvc_stage, info.name,
                   {k: v for s in stages for k, v in stage_params(flat, s, root).items()})
    if info.is_pretrained:
        if not metrics_path.is_file():
            return None
        view.model = "pretrained" if params.mlflow.log_checkpoints else None
    else:
        weights = workspace.stage_dir(info.name) / info.weights_file
        if not weights.is_file():
            return None
        view.tags = checkpoint_tags(weights)
        view.checkpoint = str(weights.resolve())
        view.add_artifact(sidecar_path(weights), "checkpoint")
        if params.mlflow.log_checkpoints:
            if info.has_model:
                view.model = "checkpoint"
            else:  # CLIP-ReID's prompts: the file itself, as their training run logs it
                view.add_artifact(weights, "checkpoint")
    if info.has_model and metrics_path.is_file():
        view.metrics = eval_metrics(json.loads(metrics_path.read_text(encoding="utf-8")))
        for path, folder in ((metrics_path, "eval"), (workspace.stage_cmc(info.name), "eval/cmc"),
                             (workspace.stage_roc(info.name), "eval/roc"),
                             (workspace.stage_examples(info.name), "eval/examples")):
            view.add_artifact(path, folder)  # as the evaluation logs them (ROC: when written)
    return view


def _summary_views(flat: dict[str, str], workspace: Workspace, root: Path) -> list[RunView]:
    """The index's and the report's runs, when DVC holds their outputs."""
    views = []
    if workspace.index_metrics.is_file():
        summary = json.loads(workspace.index_metrics.read_text(encoding="utf-8"))
        view = RunView("index", "index", stage_params(flat, "index", root),
                       metrics=index_metrics(summary))
        view.add_artifact(workspace.index_metrics, "index")
        views.append(view)
    if workspace.report.is_file():
        view = RunView("report", "report", stage_params(flat, "report", root))
        for path in (workspace.report, workspace.report_figures / "cmc.png",
                     workspace.report_figures / "examples.png"):
            view.add_artifact(path, "report")
        views.append(view)
    return views


# -------------------------------------------------------------------------------------------
# Snapshot -> the store


def reconcile(client: Any, snap: Snapshot, experiment_id: str,
              spooled: Path | None = None) -> list[str]:
    """Make the store hold ``snap``; returns one line per change (none: it held it all).
    ``spooled``: the spool folder the snapshot's copied files are relative to."""
    changes: list[str] = []
    parent = ensure_parent(client, experiment_id, snap.key, snap.label, snap.parent_tags)
    digests: dict[str, str | None] = {}
    for view in snap.runs:
        run = _find_run(client, experiment_id, snap.key, view)
        if run is None:
            run = _create_run(client, experiment_id, snap, view, parent)
            changes.append(f"run {snap.label}/{view.name}: created ({RESTORED_TAG})")
        done = _complete(client, run, view, spooled)
        if view.model:
            digest, registered = _ensure_model(client, run, view, snap, spooled)
            digests[view.name] = digest
            done += registered
        changes += [f"run {snap.label}/{view.name}: {what}" for what in done]
    return changes + _move_aliases(client, snap.champions, digests, snap.alias())


def _find_run(client: Any, experiment_id: str, key: str, view: RunView) -> Any | None:
    query = f"tags.`{PIPELINE_TAG}` = '{key}' and tags.`clipid.stage` = '{view.stage}'"
    if view.tags.get(CHECKPOINT_TAG):
        query += f" and tags.`{CHECKPOINT_TAG}` = '{view.tags[CHECKPOINT_TAG]}'"
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"])
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return (finished or runs or [None])[0]


def _create_run(client: Any, experiment_id: str, snap: Snapshot, view: RunView,
                parent: str) -> Any:
    tags = {**snap.parent_tags, **view.tags, "clipid.stage": view.stage,
            PIPELINE_TAG: snap.key, PARENT_TAG: parent, RESTORED_TAG: "dvc"}
    tags.pop(PIPELINE_LABEL_TAG, None)
    run = client.create_run(experiment_id, run_name=f"{snap.label}/{view.name}", tags=tags)
    client.set_terminated(run.info.run_id, status="FINISHED")
    return client.get_run(run.info.run_id)


def _complete(client: Any, run: Any, view: RunView, spooled: Path | None) -> list[str]:
    """Add the params, tags, metrics and artifacts ``run`` lacks."""
    from mlflow.entities import Metric, Param, RunTag

    run_id, data = run.info.run_id, run.data
    params = [Param(k, v) for k, v in sorted(view.params.items()) if k not in data.params]
    tags = [RunTag(k, v) for k, v in view.tags.items() if k not in data.tags]
    now = now_ms()
    metrics = [Metric(k, v, now, 0) for k, v in view.metrics.items() if k not in data.metrics]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start:start + 100])
    if tags or metrics:
        client.log_batch(run_id, metrics=metrics, tags=tags)
    done = [f"{len(params)} params"] if params else []
    done += [f"{len(metrics)} metrics"] if metrics else []
    return done + _add_artifacts(client, run_id, view, spooled)


def _add_artifacts(client: Any, run_id: str, view: RunView, spooled: Path | None) -> list[str]:
    from mlflow.entities import RunTag

    held: dict[str, set[str]] = {}
    added, missing = [], []
    for artifact in view.artifacts:
        folder, source = artifact["artifact_path"], Path(artifact["path"])
        if folder not in held:
            held[folder] = {Path(f.path).name for f in client.list_artifacts(run_id, folder)}
        if source.name in held[folder]:
            continue
        kept = kept_file(artifact, spooled)
        if kept is None:
            missing.append(source.name)  # changed since the snapshot: not logged wrongly
            continue
        client.log_artifact(run_id, str(kept), folder)
        added.append(f"{folder}/{source.name}")
    if missing:
        client.log_batch(run_id, tags=[RunTag(MISSING_TAG, ", ".join(missing))])
    return [f"artifacts {', '.join(added)}"] if added else []


def _ensure_model(client: Any, run: Any, view: RunView, snap: Snapshot, spooled: Path | None
                  ) -> tuple[str | None, list[str]]:
    """The digest of the stage's weights, and whether they had to be registered now."""
    from clipid.deploy.registry import log_checkpoint_model, log_stage_model

    digest = run.data.tags.get(SHA_TAG) or view.tags.get(CHECKPOINT_TAG)
    if digest and registered_versions(client, digest):
        if SHA_TAG not in run.data.tags:
            client.set_tag(run.info.run_id, SHA_TAG, digest)
        return digest, []
    if view.model == "checkpoint":
        checkpoint = kept_file(view.weights, spooled)  # the spool's copy outlives a temp workspace
        if checkpoint is None or view.weights["sha256"] != digest:
            log.warning("%s: %s changed since it was tracked; no model version logged",
                        view.name, view.checkpoint)
            return digest, []
        versions = log_checkpoint_model(client, run.info.run_id, checkpoint, view.name)
    else:
        from clipid.models.stages import model_for_stage

        params = params_from_dict(snap.params_yaml, source="params.yaml")
        versions = log_stage_model(client, run.info.run_id, model_for_stage(params, view.name),
                                   view.name)
        digest = client.get_run(run.info.run_id).data.tags.get(SHA_TAG)
        drop_duplicate_versions(client, digest)
    return digest, [f"registered {', '.join(f'{n} version {v}' for n, v in versions.items())}"]


def _move_aliases(client: Any, champions: dict[str, str], digests: dict[str, str | None],
                  alias: str = CHAMPION) -> list[str]:
    """``alias`` of each registered model on the version register.json's stage holds."""
    from mlflow.exceptions import MlflowException

    changes = []
    for model, stage in sorted(champions.items()):
        version = registered_versions(client, digests[stage]).get(model) \
            if digests.get(stage) else None
        if version is None:
            log.warning("%s: %s has no registered version; alias '%s' not moved", model, stage,
                        alias)
            continue
        try:
            current = str(client.get_model_version_by_alias(model, alias).version)
        except MlflowException:
            current = None
        if current != version:
            client.set_registered_model_alias(model, alias, version)
            changes.append(f"{model}@{alias} -> version {version} ({stage})")
    return changes


# -------------------------------------------------------------------------------------------
# the spool


def _folder(root: Path) -> Path:
    return spool_dir(root) / "pipelines"


def write_spooled(snap: Snapshot, root: Path) -> Path:
    """Keep ``snap`` for a later reconciliation, its files and checkpoints kept by content;
    returns its path."""
    folder = _folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    for number, view in enumerate(snap.runs):
        files = folder / f"{snap.id}.files" / str(number)
        keep_artifacts(view.artifacts, folder, files)
        if view.model == "checkpoint" and view.checkpoint:
            weights = [view.weights]
            keep_artifacts(weights, folder, files / "weights")
            view.checkpoint_copy = weights[0]["copy"]
    path = folder / f"{snap.id}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(snap), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def pending(root: Path) -> list[tuple[Path, Snapshot]]:
    """Spooled snapshots, oldest first."""
    found = []
    for path in sorted(_folder(root).glob("*.json")):
        try:
            found.append((path, Snapshot.from_json(json.loads(path.read_text(encoding="utf-8")))))
        except (TypeError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable spooled pipeline snapshot ({exc})") from exc
    return sorted(found, key=lambda item: item[1].created)


def replay_pending(client: Any, root: Path, experiment_id: Any,
                   only_uri: str | None = None) -> list[tuple[Snapshot, list[str]]]:
    """Reconcile the spooled snapshots (those meant for ``only_uri`` when given); each one
    done leaves the spool. ``experiment_id``: (name, artifact location, store meant for) -> id."""
    import shutil

    done = []
    for path, snap in pending(root):
        if only_uri is not None and snap.uri != only_uri:
            continue
        exp = experiment_id(snap.experiment, snap.artifact_location, snap.uri)
        done.append((snap, reconcile(client, snap, exp, spooled=path.parent)))
        shutil.rmtree(path.with_suffix(".files"), ignore_errors=True)
        path.unlink(missing_ok=True)
    return done
