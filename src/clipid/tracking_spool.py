"""The local spool of MLflow runs that could not be written to the store.

A :class:`RunRecord` holds everything a stage logs into one run: params, tags, every metric with
its step and timestamp, artifact paths (with their SHA-256), small texts and dicts. The
``Tracker`` keeps one for every run; when the store cannot be written after retries, the record
goes to ``<root>/.clipid/spool/<id>.json`` and :func:`replay` later writes it, with its original
timestamps, into a store: automatically at the start of the next stage that reaches the same
store, or on demand with ``clipid tracking sync``.

Artifacts are spooled by path and hash. Files up to ``SMALL_FILE`` bytes (sidecars, metrics JSON,
report figures) are also copied into ``<id>.files/``, because the next run of their stage
overwrites them; bigger ones (checkpoints) are DVC outputs that DVC's cache keeps, so the path
and hash suffice, and a file whose hash has changed by replay time is left out of the run and
named in its tag ``clipid.spool.missing_artifacts`` rather than logged wrongly.
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

from clipid.files import file_sha256
from clipid.tracking_pipeline import PARENT_TAG, PIPELINE_TAG, ensure_parent

log = logging.getLogger(__name__)

__all__ = ["RunRecord", "SpoolEntry", "pending", "replay", "spool_dir", "sync", "write"]

FORMAT = 1
SMALL_FILE = 1 << 20              # artifacts up to 1 MiB are copied into the spool
_BATCH = 1000                     # MLflow's log_batch limit for metrics (params: 100)
CHECKPOINT_TAG = "clipid.checkpoint.sha256"
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
    artifacts: list[dict] = field(default_factory=list)      # path, artifact_path, sha256, copy
    texts: list[dict] = field(default_factory=list)          # artifact_file, text | dict
    resume_run_id: str | None = None           # log into this existing run (an evaluation)
    resume_checkpoint: str | None = None       # ... or into the run that wrote these weights
    partial_run_id: str | None = None          # what reached the store before it failed

    @property
    def resumes(self) -> bool:
        return bool(self.resume_run_id or self.resume_checkpoint)

    def add_artifact(self, path: Path, artifact_path: str | None, sha256: str | None) -> None:
        path = Path(path).resolve()
        self.artifacts.append({"path": str(path), "artifact_path": artifact_path,
                               "sha256": sha256 or file_sha256(path), "copy": None})

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
    """Write ``record`` atomically to the spool (copying its small artifacts) and return it."""
    folder = spool_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    copy_small_artifacts(record.artifacts, folder, folder / f"{record.id}.files")
    path = folder / f"{record.id}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **asdict(record)}, indent=1) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


def copy_small_artifacts(artifacts: list[dict], folder: Path, files: Path) -> None:
    """Copy each artifact up to SMALL_FILE bytes into ``files/<n>/`` (its ``copy``, relative to
    ``folder``): the next run of its stage overwrites the original."""
    for number, artifact in enumerate(artifacts):
        source = Path(artifact["path"])
        if artifact["copy"] or not source.is_file() or source.stat().st_size > SMALL_FILE:
            continue
        if file_sha256(source) != artifact["sha256"]:
            continue  # already overwritten: replay will name it missing
        copy = files / str(number) / source.name  # keeps the name the artifact is logged by
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, copy)
        artifact["copy"] = str(copy.relative_to(folder))


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
    from mlflow.entities import Metric, Param, RunTag

    record = entry.record
    target = _resume_target(client, record, experiment_id)
    status = "FAILED" if record.status == "RUNNING" else record.status  # its process is gone
    tags = {**record.tags, "clipid.spool.id": record.id}
    if target is None:
        exp = experiment_id(record)
        for stale in client.search_runs([exp], f"tags.`clipid.spool.id` = '{record.id}'"):
            client.delete_run(stale.info.run_id)  # an earlier replay that did not finish
        run_id = client.create_run(exp, start_time=record.start_time,
                                   tags={**tags, **_parent(client, exp, record)},
                                   run_name=record.run_name).info.run_id
        params = [Param(k, v) for k, v in sorted(record.params.items())]
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start:start + 100])
    else:
        run_id = target
    metrics = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in record.metrics]
    for start in range(0, len(metrics), _BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + _BATCH])
    missing = _replay_artifacts(client, run_id, entry)
    if missing:
        tags["clipid.spool.missing_artifacts"] = ", ".join(missing)
    if target is not None:  # an evaluation: the training run keeps its own tags
        tags = {"clipid.eval_stage": record.tags.get("clipid.eval_stage",
                                                     record.tags.get("clipid.stage", "")),
                **{k: v for k, v in tags.items() if k.startswith("clipid.spool.")}}
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    if target is None:
        client.set_terminated(run_id, status=status, end_time=record.end_time or now_ms())
    _supersede(client, record, run_id)
    return run_id


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
    missing = []
    for artifact in entry.record.artifacts:
        source = Path(artifact["path"])
        if artifact["copy"]:
            source = entry.path.parent / artifact["copy"]
        elif not source.is_file() or file_sha256(source) != artifact["sha256"]:
            missing.append(Path(artifact["path"]).name)
            continue
        client.log_artifact(run_id, str(source), artifact["artifact_path"])
    for text in entry.record.texts:
        if "dict" in text:
            client.log_dict(run_id, text["dict"], text["artifact_file"])
        else:
            client.log_text(run_id, text["text"], text["artifact_file"])
    return missing


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
