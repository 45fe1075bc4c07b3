"""The local spool of MLflow runs that could not be written to the store.

A :class:`RunRecord` holds everything a stage logs into one run: params, tags, every metric with
its step and timestamp, artifact paths (with their SHA-256), small texts and dicts. The
``Tracker`` keeps one for every run; when the store cannot be written after retries, the record
goes to ``<root>/.clipid/spool/<id>.json`` and :func:`replay` later writes it, with its original
timestamps, into a store: automatically at the start of the next stage that reaches the same
store, or on demand with ``clipid tracking sync``.

Every artifact is kept by content in ``<id>.files/`` when the record is written, whatever its
size: the stage may run in a temporary copy of the workspace that DVC deletes afterwards
(``dvc exp run --temp``, queued experiments), and the next run of a stage overwrites its files.
Files up to ``COPY_UP_TO`` bytes (sidecars, metrics JSON) are copied, so that even a rewrite in
place leaves the kept one alone; bigger ones (checkpoints, figures) are hard links where the spool
is on the same filesystem (no extra disk: clipid writes checkpoints to a temporary name and
renames it, so a link keeps the old content) and copies elsewhere. Replay checks each kept file's
SHA-256: one that changed anyway is left out of the run and named in its tag
``clipid.spool.missing_artifacts`` rather than logged wrongly.

A CLIP checkpoint is recorded as its stage's model (``"model"``), kept with its sidecar, and
replay logs it as the live run does: the registered MLflow Model
(:func:`clipid.deploy.registry.log_checkpoint_model`), not the raw file; versions that the
half-written run registered before the store failed make way for the replayed run's. An
evaluation's record that goes into its training run leaves that run's own tags alone: it adds
``clipid.spool.eval_id`` (and ``clipid.spool.eval_missing_artifacts``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipid.files import file_sha256, sidecar_path
from clipid.tracking_pipeline import PARENT_TAG, PIPELINE_TAG, ensure_parent

log = logging.getLogger(__name__)

__all__ = ["RunRecord", "SpoolEntry", "keep_artifacts", "kept_file", "pending", "replay",
           "spool_dir", "sync", "write"]

FORMAT = 1
COPY_UP_TO = 1 << 20              # kept artifacts up to 1 MiB are copied, bigger ones linked
_BATCH = 1000                     # MLflow's log_batch limit for metrics (params: 100)
CHECKPOINT_TAG = "clipid.checkpoint.sha256"
SPOOL_ID_TAG = "clipid.spool.id"              # on the run a record was replayed as
EVAL_ID_TAG = "clipid.spool.eval_id"          # ... on the training run an evaluation went into
MISSING_TAG = "clipid.spool.missing_artifacts"
EVAL_MISSING_TAG = "clipid.spool.eval_missing_artifacts"
PIPELINE_LABEL_TAG = "clipid.pipeline.label"  # the parent run's name, for replay


def now_ms() -> int:
    return int(time.time() * 1000)


def format_time(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass
class RunRecord:
    """One run as the Tracker logged it; JSON-serialisable."""

    uri: str                                   # the store the run was meant for
    experiment: str
    run_name: str
    artifact_location: str | None = None       # for a new experiment in our own store
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    start_time: int = field(default_factory=now_ms)
    end_time: int | None = None
    status: str = "RUNNING"
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    error: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[list] = field(default_factory=list)        # [key, value, timestamp ms, step]
    # path, artifact_path, sha256, copy (kept file, relative to the spool), model (its stage)
    artifacts: list[dict] = field(default_factory=list)
    texts: list[dict] = field(default_factory=list)          # artifact_file, text | dict
    resume_run_id: str | None = None           # log into this existing run (an evaluation)
    resume_checkpoint: str | None = None       # ... or into the run that wrote these weights
    partial_run_id: str | None = None          # what reached the store before it failed

    @property
    def resumes(self) -> bool:
        return bool(self.resume_run_id or self.resume_checkpoint)

    def add_artifact(self, path: Path, artifact_path: str | None, sha256: str | None,
                     model: str | None = None) -> None:
        """``model``: the stage whose MLflow Model this checkpoint is (replay registers it)."""
        path = Path(path).resolve()
        self.artifacts.append({"path": str(path), "artifact_path": artifact_path,
                               "sha256": sha256 or file_sha256(path), "copy": None,
                               "model": model})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        data = dict(data)
        if data.pop("format", None) != FORMAT:
            raise ValueError("not a clipid spool record of format 1")
        return cls(**data)


@dataclass
class SpoolEntry:
    path: Path
    record: RunRecord

    @property
    def live(self) -> bool:
        """A run whose process is still going (on this host): not to be replayed yet."""
        return self.record.status == "RUNNING" and pid_alive(self.record.pid, self.record.host)


def pid_alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # can't tell for another machine: assume it is still running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spool_dir(root: Path) -> Path:
    return root / ".clipid" / "spool"


def write(record: RunRecord, root: Path) -> Path:
    """Write ``record`` atomically to the spool (keeping its artifacts) and return it."""
    folder = spool_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    keep_artifacts(record.artifacts, folder, folder / f"{record.id}.files")
    path = folder / f"{record.id}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **asdict(record)}, indent=1) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


def keep_artifacts(artifacts: list[dict], folder: Path, files: Path) -> None:
    """Keep each artifact not kept yet in ``files/<n>/`` (its ``copy``, relative to ``folder``),
    a model's checkpoint with its sidecar beside it (loading it needs both). One that cannot be
    kept stays by path: a warning, never the loss of the record."""
    for number, artifact in enumerate(artifacts):
        source = Path(artifact["path"])
        if artifact["copy"] or not source.is_file():
            continue
        if file_sha256(source) != artifact["sha256"]:
            continue  # already overwritten: replay will name it missing
        kept = files / str(number) / source.name  # keeps the name the artifact is logged by
        try:
            keep_file(source, kept)
            if artifact.get("model") and sidecar_path(source).is_file():
                keep_file(sidecar_path(source), sidecar_path(kept))
        except OSError as error:
            log.warning("could not keep %s in the spool (%s); it is spooled by path", source,
                        error)
            continue
        artifact["copy"] = str(kept.relative_to(folder))


def keep_file(source: Path, kept: Path) -> None:
    """``kept`` holding ``source``'s content: a copy of a small file (safe from a rewrite in
    place), a hard link of a big one (no extra disk), a copy where linking fails (another
    filesystem)."""
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.unlink(missing_ok=True)
    if source.stat().st_size > COPY_UP_TO:
        try:
            os.link(source, kept)
            return
        except OSError:
            pass
    shutil.copyfile(source, kept)


def kept_file(artifact: dict, folder: Path | None) -> Path | None:
    """The file holding an artifact's spooled content: its kept file (relative to ``folder``),
    else the original while unchanged; None when neither holds it any more."""
    candidates = [folder / artifact["copy"]] if artifact.get("copy") and folder else []
    for source in (*candidates, Path(artifact["path"])):
        if source.is_file() and file_sha256(source) == artifact["sha256"]:
            return source
    return None


def pending(root: Path) -> list[SpoolEntry]:
    """Spooled runs, oldest first (a training run replays before its evaluation)."""
    entries = []
    for path in sorted(spool_dir(root).glob("*.json")):
        try:
            entries.append(SpoolEntry(path, RunRecord.from_json(
                json.loads(path.read_text(encoding="utf-8")))))
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable spool record ({exc})") from exc
    return sorted(entries, key=lambda e: e.record.start_time)


def remove(entry: SpoolEntry) -> None:
    shutil.rmtree(entry.path.with_suffix(".files"), ignore_errors=True)
    entry.path.unlink(missing_ok=True)


@contextlib.contextmanager
def _sync_lock(root: Path, wait: bool) -> Iterator[bool]:
    """One replayer at a time; ``wait=False`` yields False when another one holds it."""
    folder = spool_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sync(client: Any, root: Path, experiment_id: Callable[[RunRecord], str],
         only_uri: str | None = None, wait: bool = True,
         then: Callable[[], Any] | None = None) -> list[tuple[SpoolEntry, str]]:
    """Replay the pending runs (those meant for ``only_uri`` when given) into ``client``'s store;
    each replayed one leaves the spool. Returns ``(entry, run id)`` of each replayed run.
    Runs still in progress stay; a run whose process died before it ended replays FAILED.
    ``then`` runs afterwards under the same lock (the spooled pipeline views)."""
    done: list[tuple[SpoolEntry, str]] = []
    with _sync_lock(root, wait) as locked:
        if not locked:
            return done
        for entry in pending(root):
            if entry.live or (only_uri is not None and entry.record.uri != only_uri):
                continue
            try:
                done.append((entry, replay(client, entry, experiment_id)))
            except Exception as error:  # it stays in the spool for the next try
                log.warning("%s: replay failed (%s: %s); it stays in the spool", entry.path,
                            type(error).__name__, error)
                continue
            remove(entry)
        if then is not None:
            then()
    return done


def replay(client: Any, entry: SpoolEntry, experiment_id: Callable[[RunRecord], str]) -> str:
    """Write one spooled run into ``client``'s store; returns the id of the run it went into."""
    record = entry.record
    target = _resume_target(client, record, experiment_id)
    if target is not None:
        return _replay_into(client, entry, target)
    run_id = _create_run(client, record, experiment_id(record))
    _log_metrics(client, run_id, record)
    missing = _replay_artifacts(client, run_id, entry)
    tags = {**record.tags, SPOOL_ID_TAG: record.id}
    if missing:
        tags[MISSING_TAG] = ", ".join(missing)
    _log_tags(client, run_id, tags)
    status = "FAILED" if record.status == "RUNNING" else record.status  # its process is gone
    client.set_terminated(run_id, status=status, end_time=record.end_time or now_ms())
    _supersede(client, record, run_id)
    return run_id


def _create_run(client: Any, record: RunRecord, exp: str) -> str:
    """The run a record replays as, with its params; an earlier replay of it that did not
    finish goes first, with the versions it registered."""
    for stale in client.search_runs([exp], f"tags.`{SPOOL_ID_TAG}` = '{record.id}'"):
        _drop_versions(client, stale.info.run_id)
        client.delete_run(stale.info.run_id)
    run_id = client.create_run(exp, start_time=record.start_time,
                               tags={**record.tags, SPOOL_ID_TAG: record.id,
                                     **_parent(client, exp, record)},
                               run_name=record.run_name).info.run_id
    _log_params(client, run_id, record.params)
    return run_id


def _replay_into(client: Any, entry: SpoolEntry, run_id: str) -> str:
    """An evaluation into its training run: its metrics, artifacts and the params the run
    lacks; the run keeps its own tags (its ``clipid.spool.id`` among them)."""
    record = entry.record
    run = client.get_run(run_id)
    if run.data.tags.get(EVAL_ID_TAG) == record.id:
        return run_id  # replayed before; only leaving the spool did not happen
    _log_params(client, run_id, {k: v for k, v in record.params.items()
                                 if k not in run.data.params})  # MLflow refuses to change one
    _log_metrics(client, run_id, record)
    missing = _replay_artifacts(client, run_id, entry)
    tags = {"clipid.eval_stage": record.tags.get("clipid.eval_stage",
                                                 record.tags.get("clipid.stage", "")),
            EVAL_ID_TAG: record.id}  # last: marks the replay complete
    if missing:
        tags = {EVAL_MISSING_TAG: ", ".join(missing), **tags}
    _log_tags(client, run_id, tags)
    return run_id


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    batch = [Param(k, v) for k, v in sorted(params.items())]
    for start in range(0, len(batch), 100):  # MLflow's log_batch limit for params
        client.log_batch(run_id, params=batch[start:start + 100])


def _log_metrics(client: Any, run_id: str, record: RunRecord) -> None:
    from mlflow.entities import Metric

    metrics = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in record.metrics]
    for start in range(0, len(metrics), _BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + _BATCH])


def _log_tags(client: Any, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _parent(client: Any, experiment_id: str, record: RunRecord) -> dict[str, str]:
    """The parent-run tag of a run of a pipeline execution (the parent found or created)."""
    key = record.tags.get(PIPELINE_TAG)
    if not key:
        return {}
    parent_keys = ("dvc.exp_name", "dvc.exp_baseline_rev", "git.commit", PIPELINE_LABEL_TAG)
    tags = {k: record.tags[k] for k in parent_keys if record.tags.get(k)}
    label = record.tags.get(PIPELINE_LABEL_TAG) or key
    return {PARENT_TAG: ensure_parent(client, experiment_id, key, label, tags,
                                      record.start_time)}


def _resume_target(client: Any, record: RunRecord,
                   experiment_id: Callable[[RunRecord], str]) -> str | None:
    """The existing run a spooled evaluation belongs in, if the store has it."""
    from mlflow.exceptions import MlflowException

    if record.resume_run_id:
        with contextlib.suppress(MlflowException):
            run = client.get_run(record.resume_run_id)
            if run.info.lifecycle_stage == "active":
                return run.info.run_id
    if record.resume_checkpoint:
        query = f"tags.`{CHECKPOINT_TAG}` = '{record.resume_checkpoint}'"
        if record.tags.get(PIPELINE_TAG):  # the training run of the same pipeline execution
            query += f" and tags.`{PIPELINE_TAG}` = '{record.tags[PIPELINE_TAG]}'"
        runs = client.search_runs([experiment_id(record)], query,
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            return runs[0].info.run_id
    return None


def _replay_artifacts(client: Any, run_id: str, entry: SpoolEntry) -> list[str]:
    """Log the kept artifacts (a model's checkpoint as its registered MLflow Model) and texts;
    returns the names of those whose content is gone."""
    from clipid.deploy.registry import log_checkpoint_model

    missing = []
    for artifact in entry.record.artifacts:
        source = kept_file(artifact, entry.path.parent)
        if source is None:
            missing.append(Path(artifact["path"]).name)
        elif artifact.get("model"):
            if entry.record.partial_run_id:  # versions of a half-done upload: the replay's own
                _drop_versions(client, entry.record.partial_run_id)
            log_checkpoint_model(client, run_id, source, artifact["model"])
        else:
            client.log_artifact(run_id, str(source), artifact["artifact_path"])
    for text in entry.record.texts:
        if "dict" in text:
            client.log_dict(run_id, text["dict"], text["artifact_file"])
        else:
            client.log_text(run_id, text["text"], text["artifact_file"])
    return missing


def _drop_versions(client: Any, run_id: str) -> None:
    """Delete the model versions registered from run ``run_id`` (one replaced by a replay)."""
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        client.delete_model_version(version.name, version.version)


def _supersede(client: Any, record: RunRecord, run_id: str) -> None:
    """The half-written run the store got before it failed: the replayed one holds all of it."""
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    if not record.partial_run_id or record.partial_run_id == run_id:
        return
    with contextlib.suppress(MlflowException):
        client.log_batch(record.partial_run_id,
                         tags=[RunTag("clipid.superseded_by", run_id)])
        client.set_terminated(record.partial_run_id, status="FAILED")
        client.delete_run(record.partial_run_id)  # soft: `mlflow gc` or the UI can restore it
