"""MLflow tracking: one run per stage execution, in one store per repository.

The store is ``MLFLOW_TRACKING_URI`` when set, otherwise ``sqlite:///<root>/mlflow.db`` with
artifacts in ``<root>/mlruns``. ``<root>`` is ``DVC_ROOT``, which DVC sets for every stage
command and points at the workspace also for ``dvc exp run --temp`` and queued experiments that
run in a copy of the repository, so their runs land in the workspace's store.

Tracking never stops the pipeline, and never loses a run. Every store call is retried with
backoff; when the store still cannot be written (server down, file locked, disk full), the run
goes on in the local spool ``<root>/.clipid/spool`` (:mod:`clipid.tracking_spool`), one warning
says so, and so does the stage's last output line (``UNTRACKED``, printed by the CLI). The next
stage that reaches the same store replays it; ``clipid tracking sync`` does on demand.

A SQLite store is made safe for parallel stages (``dvc queue start -j N``): its schema is
created under an exclusive file lock (``mlflow.db.lock``), it runs in WAL mode, and MLflow's own
20 s busy timeout plus the retries ride out a busy writer. A run its process left RUNNING (killed,
out of memory) is marked FAILED by the next stage on the same host.

Everything goes through an explicit ``MlflowClient``, never MLflow's fluent API: that API keeps
a process-wide active run and exports ``MLFLOW_TRACKING_URI`` into ``os.environ``, which would
leak one store into the next ``Tracker`` of the same process (tests, notebooks).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import random
import re
import socket
import sqlite3
import subprocess
import time
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

from clipid import tracking_spool as spool
from clipid.config import Params, flatten_params
from clipid.files import file_sha256, sidecar_path
from clipid.tracking_pipeline import (
    PARENT_TAG,
    PIPELINE_TAG,
    Pipeline,
    current_pipeline,
    ensure_parent,
    stage_params,
)

log = logging.getLogger(__name__)

__all__ = ["EXPERIMENT", "UNTRACKED", "Tracker", "checkpoint_run", "find_runs", "mlflow_client",
           "open_store", "own_artifact_location", "pipeline_tags", "replay_spool",
           "spool_status", "store_root", "sync_spool", "tracking_uri", "ui_command",
           "with_retries"]

EXPERIMENT = "clipid"
_MAX_PARAMS_PER_CALL = 100     # MLflow's log_batch limit for params
_MAX_METRICS_PER_CALL = 1000   # ... and for metrics
_MAX_PARAM_VALUE = 6000        # longest param value MLflow stores
_CONNECT_TIMEOUT_S = 3.0       # up-front reachability probe of an HTTP server
_RETRIES = 4                   # retries of a failed store call before the run is spooled ...
_BACKOFF_S = 0.1               # ... after ~0.1, 0.3, 0.9, 2.7 s (times a jitter of 0.5-1.5)
# Quiet and quick by default; a user's own settings win. MLflow otherwise retries an
# unreachable server for minutes (7 retries with backoff, 120 s timeout each).
_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}


def store_root() -> Path:
    """``DVC_ROOT``, else the enclosing DVC repository, else the working directory."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return here


def tracking_uri(root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store in ``root`` (default: store_root)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root or store_root()) / 'mlflow.db'}"


def artifact_root(root: Path | None = None) -> Path:
    return (root or store_root()) / "mlruns"


def ui_command(host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The ``mlflow ui`` command line that browses this repository's store: one worker (one
    person's browser; MLflow's default four take twice as long to start)."""
    root = store_root()
    return ["mlflow", "ui", "--backend-store-uri", tracking_uri(root),
            "--default-artifact-root", str(artifact_root(root)),
            "--host", host, "--port", str(port), "--workers", "1"]


def mlflow_client(uri: str) -> Any:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient  # slow to import (~2-3 s): only stages that track pay

    path = _sqlite_path(uri)
    if path is None:
        return MlflowClient(tracking_uri=uri)
    # MLflow's SqlAlchemyStore creates the schema unguarded when it finds tables missing: two
    # processes on a new store both create them and one dies ("table runs already exists").
    # Creating the client under an exclusive lock lets the first one create the schema alone.
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(path.name + ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # WAL (a property of the file, kept once set): readers don't block the writer.
            with contextlib.closing(sqlite3.connect(path, timeout=60)) as db:
                db.execute("PRAGMA journal_mode=WAL")
            return MlflowClient(tracking_uri=uri)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory ones)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def with_retries(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, retried with exponential backoff and jitter; the last error is
    raised. SQLite answers "database is locked" when another writer outlasts its busy timeout
    (MLflow sets 20 s), a server may be restarting: both pass on retry."""
    for attempt in range(_RETRIES + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            if attempt == _RETRIES:
                raise
            delay = _BACKOFF_S * 3 ** attempt * (0.5 + random.random())
            log.debug("MLflow call failed (%s); retrying in %.1f s", error, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _check_reachable(uri: str) -> None:
    """Fail in seconds, not minutes, when an HTTP tracking server is not listening."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    if urllib.request.getproxies().get(parsed.scheme) and \
            not urllib.request.proxy_bypass(parsed.hostname):
        return  # reached through a proxy: a direct probe proves nothing; the short timeout rules
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    with socket.create_connection((parsed.hostname, port), timeout=_CONNECT_TIMEOUT_S):
        pass


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _metric_name(name: str) -> str:
    """MLflow allows letters, digits and ``_ - . space / :``; anything else becomes ``_``."""
    return re.sub(r"[^\w\-. /:]", "_", name)


def _get_or_create_experiment(client: Any, name: str, location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        # Parallel queued experiments may race to create it: the loser reads the winner's.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class Tracker:
    """One MLflow run, as a context manager.

    ``run_id`` reopens an existing run instead of starting one; ``checkpoint`` reopens the run
    of this pipeline execution that wrote those weights, found by their SHA-256 (the evaluation
    stage logs into the run that trained the model). A reopened run keeps its status. Nothing
    is logged when ``enabled`` is false (the processes other than rank 0 of a distributed run).

    Inside a git repository the run is a child of its pipeline execution's parent run
    (:mod:`clipid.tracking_pipeline`), named ``<label>/<run_name>``, and logs the params that
    ``param_stages`` (default: ``stage``) list in dvc.yaml.

    Every store call is retried; when one still fails, the run goes on in the local spool
    (:mod:`clipid.tracking_spool`) with everything it logged so far, and is replayed later.
    """

    def __init__(self, stage: str, params: Params, run_name: str | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None,
                 enabled: bool = True, checkpoint: Path | None = None,
                 param_stages: tuple[str, ...] | None = None) -> None:
        self.stage = stage
        self.enabled = enabled
        self.params = params
        self.param_stages = param_stages or (stage,)
        # The model stage (stage4, ...): its registered versions are tagged with it, while the
        # run's name gets the execution's label in front (``<label>/stage4``).
        self.model_stage = self.run_name = run_name or stage
        self.pipeline: Pipeline | None = None
        self.extra_tags = dict(tags or {})
        self.resume_id = run_id
        self.resume_checkpoint = checkpoint
        self.uri = ""
        self.spooled: Path | None = None   # where the run went when the store failed
        self._root = Path()
        self._record: spool.RunRecord | None = None
        self._client: Any = None
        self._run_id: str | None = None
        self._resumed = False
        self._offline = False
        self._warned_metrics = False

    @property
    def run_id(self) -> str | None:
        """The run in the store (None when spooled or disabled)."""
        return self._run_id

    @property
    def active(self) -> bool:
        return self._run_id is not None

    @property
    def recording(self) -> bool:
        return self._record is not None

    # ---------------------------------------------------------------------------------------
    # start and end

    def __enter__(self) -> Tracker:
        if not self.enabled:
            return self
        self._root = root = store_root()
        self.uri = tracking_uri(root)
        self.pipeline = current_pipeline(root)
        if self.pipeline is not None:
            self.run_name = self.pipeline.run_name(self.run_name)
        self._record = spool.RunRecord(
            uri=self.uri, experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT,
            run_name=self.run_name, artifact_location=own_artifact_location(root),
            tags=self._tags(root), params=self._stage_params())
        self._record.resume_run_id = self.resume_id
        if self.resume_checkpoint is not None:
            self._record.resume_checkpoint = file_sha256(self.resume_checkpoint)
        try:
            self._client = with_retries(mlflow_client, self.uri)
            with_retries(self._open_run)
        except Exception as error:  # the store can't be written: the run goes to the spool
            self._go_offline(error)
            return self
        if self._resumed:  # add this stage's params (an evaluation's: eval.*) to the run's
            self._call(self._log_resumed)
        else:
            self._call(self._log_batch, params=self._record.params)
        if self.active:
            self._replay_spool()
        return self

    def _stage_params(self) -> dict[str, str]:
        flat = flatten_params(self.params)
        chosen = {}
        for stage in self.param_stages:
            chosen.update(stage_params(flat, stage, self._root))
        return {k: str(v)[:_MAX_PARAM_VALUE] for k, v in chosen.items()}

    def _open_run(self) -> None:
        """Reopen or create the run (retried as a whole: nothing here is logged twice)."""
        _check_reachable(self.uri)
        client, record = self._client, self._record
        experiment_id = self._experiment_id(record)
        try:
            _reap_dead_runs(client, experiment_id)
        except Exception as error:  # housekeeping: never a reason to lose this run
            log.warning("MLflow: looking for runs of dead processes failed (%s)", error)
        if self._resume(client, experiment_id):
            record.resume_run_id = self._run_id
            return
        tags = dict(record.tags)
        if self.pipeline is not None:
            tags[PARENT_TAG] = ensure_parent(client, experiment_id, self.pipeline.key,
                                             self.pipeline.label, pipeline_tags(self.pipeline),
                                             record.start_time)
        run = client.create_run(experiment_id, run_name=self.run_name, tags=tags,
                                start_time=record.start_time)
        self._run_id = run.info.run_id
        record.resume_run_id = record.resume_checkpoint = None  # a run of its own

    def _log_resumed(self) -> None:
        """Into a reopened run: this stage's tags and the params the run lacks (MLflow refuses
        to change a logged one)."""
        held = self._client.get_run(self._run_id).data.params
        self._log_batch(params={k: v for k, v in self._record.params.items() if k not in held},
                        tags={"clipid.eval_stage": self.stage, **self.extra_tags})

    def _experiment_id(self, record: spool.RunRecord) -> str:
        return _get_or_create_experiment(self._client, record.experiment,
                                         record.artifact_location)

    def _resume(self, client: Any, experiment_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        run = None
        if self.resume_id:
            try:
                run = client.get_run(self.resume_id)
            except MlflowException:
                run = None
        elif self._record.resume_checkpoint:
            run = checkpoint_run(client, [experiment_id], self._record.resume_checkpoint,
                                 self.pipeline.key if self.pipeline else None)
        if run is None or run.info.lifecycle_stage != "active":
            if self.resume_id or (self.resume_checkpoint and self.pipeline is None):
                # Weights trained against another store: log into a run of its own.
                log.warning("no MLflow run of %s in %s; starting a new run",
                            self.resume_id or self.resume_checkpoint, self.uri)
            return False
        self._run_id, self._resumed = run.info.run_id, True
        return True

    def _replay_spool(self) -> None:
        """Runs spooled earlier for this store go in now (unless another process is at it)."""
        try:
            replay_spool(self._client, self._root, self.uri, wait=False)
        except Exception as error:  # the spool stays for `clipid tracking sync`
            log.warning("replaying spooled MLflow runs failed (%s: %s); they stay in %s",
                        type(error).__name__, error, spool.spool_dir(self._root))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        record = self._record
        if record is None:
            return
        if exc_type is None:
            record.status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            record.status = "KILLED"
        else:
            record.status = "FAILED"
        record.end_time = spool.now_ms()
        if self.active and not self._resumed:  # a reopened training run keeps its own status
            self._call(self._client.set_terminated, self._run_id, status=record.status,
                       end_time=record.end_time)
        if self._offline:
            self._write_spool()
        self._run_id, self._record = None, None  # never swallow the exception: return None

    def _write_spool(self) -> None:
        try:
            self.spooled = spool.write(self._record, self._root)
        except OSError as error:  # a full disk: the run is lost, and that is said loudly
            self.spooled = None
            warnings.warn(f"MLflow run '{self.run_name}' is LOST: the store failed "
                          f"({self._record.error}) and so did the spool ({error})", stacklevel=3)
            UNTRACKED.append(f"MLflow run '{self.run_name}' LOST: neither the store "
                             f"({self._record.error}) nor the spool ({error}) took it")

    def _go_offline(self, error: BaseException) -> None:
        """The store failed for good: keep the run in the spool, say so once."""
        record = self._record
        record.error = f"{type(error).__name__}: {error}"
        if self._run_id is not None and not self._resumed:
            record.partial_run_id = self._run_id
            with contextlib.suppress(Exception):  # don't leave it RUNNING if we can help it
                self._client.set_terminated(self._run_id, status="FAILED")
        self._run_id, self._offline = None, True
        self._write_spool()
        if self.spooled is None:
            return
        warnings.warn(f"MLflow tracking at {self.uri} failed ({record.error}); the run is "
                      f"spooled to {self.spooled} and replayed by the next stage that reaches "
                      "the store or by `clipid tracking sync`", stacklevel=3)
        UNTRACKED.append(f"MLflow run '{self.run_name}' not tracked: spooled to {self.spooled} "
                         f"({record.error})")

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        if not self.active:
            return
        try:
            with_retries(fn, *args, **kwargs)
        except Exception as error:
            self._go_offline(error)

    # ---------------------------------------------------------------------------------------
    # what a run holds

    def _tags(self, root: Path) -> dict[str, str]:
        params = self.params
        commit = _git_commit(root)
        tags = {
            "clipid.stage": self.stage,
            "clipid.host": socket.gethostname(),
            "clipid.pid": str(os.getpid()),
            "dvc.stage": os.environ.get("DVC_STAGE", ""),
            PIPELINE_TAG: self.pipeline.key if self.pipeline else "",
            spool.PIPELINE_LABEL_TAG: self.pipeline.label if self.pipeline else "",
            "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "dvc.exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
            "git.commit": commit or "",
            "mlflow.source.git.commit": commit or "",
            "data.source": params.data.source,
            "model.name": params.model.name,
            "model.pretrained": params.model.pretrained or "random",
        }
        return {**{k: v for k, v in tags.items() if v}, **self.extra_tags}

    def _log_batch(self, params: dict[str, str] | None = None, tags: dict[str, Any] | None = None,
                   metrics: list[list] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        params_list = [Param(k, v) for k, v in sorted((params or {}).items())]
        for start in range(0, len(params_list), _MAX_PARAMS_PER_CALL):
            self._client.log_batch(self._run_id,
                                   params=params_list[start:start + _MAX_PARAMS_PER_CALL])
        metric_list = [Metric(k, v, t, s) for k, v, t, s in metrics or []]
        for start in range(0, len(metric_list), _MAX_METRICS_PER_CALL):
            self._client.log_batch(self._run_id,
                                   metrics=metric_list[start:start + _MAX_METRICS_PER_CALL])
        if tags:
            self._client.log_batch(self._run_id,
                                   tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.recording:
            return
        self._record.tags.update({k: str(v) for k, v in tags.items()})
        self._call(self._log_batch, tags=tags)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics; NaN, inf and non-numbers are skipped (MLflow's UI can't plot
        them and a stray string must not stop training)."""
        if not self.recording:
            return
        now = spool.now_ms()
        batch = [[key, value, now, step or 0] for key, value in self._clean(metrics).items()]
        if batch:
            self._record.metrics.extend(batch)
            self._call(self._log_batch, metrics=batch)

    def _clean(self, metrics: dict[str, float]) -> dict[str, float]:
        clean: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if math.isfinite(number):
                clean[_metric_name(str(key))] = number
            elif not self._warned_metrics:
                self._warned_metrics = True
                log.warning("not logging metric %r = %r to MLflow (not a finite number)",
                            key, value)
        return clean

    def log_artifact(self, path: str | Path, artifact_path: str | None = None,
                     sha256: str | None = None) -> None:
        """Log a file (``sha256``: its hash when known, saves reading it again). A missing file
        is the caller's mistake, not the store's: one warning, and the run goes on."""
        if not self.recording:
            return
        if not Path(path).is_file():
            log.warning("not logging artifact %s to MLflow: no such file", path)
            return
        self._record.add_artifact(Path(path), artifact_path, sha256)
        self._call(self._client.log_artifact, self._run_id, str(path), artifact_path)

    def log_checkpoint(self, checkpoint: Path, seconds: float) -> None:
        """What a training stage made: its training time, the hashes that make its lineage
        (``clipid lineage``), the sidecar and, unless ``mlflow.log_checkpoints`` is false, the
        weights."""
        if not self.recording:
            return
        from clipid.lineage import checkpoint_tags

        tags = checkpoint_tags(checkpoint)
        self.set_tags(tags)
        self.log_metrics({"train_seconds": seconds})
        if self.params.mlflow.log_checkpoints:
            self._log_weights(checkpoint, tags[spool.CHECKPOINT_TAG])
        self.log_artifact(sidecar_path(checkpoint), "checkpoint")

    def _log_weights(self, checkpoint: Path, sha256: str) -> None:
        """A CLIP model goes up as its registered MLflow Model (the weights once, inside it);
        other checkpoints (CLIP-ReID's prompts) as the file. The record holds it as the stage's
        model: if the run ends in the spool, whenever the store failed, the spool keeps the
        file and its replay logs and registers the model in the replayed run."""
        from clipid.deploy.registry import holds_clip_model, log_checkpoint_model

        if not holds_clip_model(checkpoint):
            self.log_artifact(checkpoint, "checkpoint", sha256=sha256)
            return
        self._record.add_artifact(checkpoint, "checkpoint", sha256, model=self.model_stage)
        self._call(log_checkpoint_model, self._client, self._run_id, checkpoint,
                   self.model_stage)

    def log_model(self, clip: Any, stage: str) -> None:
        """The MLflow Model of ``clip`` (clipid.deploy), registered as clipid-image/-text; the
        weights go to the store once, inside it. Skipped with ``mlflow.log_checkpoints: false``."""
        if self.params.mlflow.log_checkpoints and self.active:
            from clipid.deploy.registry import log_stage_model

            self._call(log_stage_model, self._client, self._run_id, clip, stage)

    def log_dict(self, dictionary: dict[str, Any], artifact_file: str) -> None:
        if self.recording:
            self._record.texts.append({"artifact_file": artifact_file, "dict": dictionary})
            self._call(self._client.log_dict, self._run_id, dictionary, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.recording:
            self._record.texts.append({"artifact_file": artifact_file, "text": text})
            self._call(self._client.log_text, self._run_id, text, artifact_file)


UNTRACKED: list[str] = []  # what this process could not track; the CLI's last output lines


def checkpoint_run(client: Any, experiment_ids: list[str], sha256: str,
                   pipeline: str | None = None) -> Any | None:
    """The newest active run that wrote weights of this SHA-256: of the pipeline execution
    ``pipeline`` when given (None if it has none); else one of the same DVC experiment first
    (identical weights can come from several runs)."""
    query = f"tags.`{spool.CHECKPOINT_TAG}` = '{sha256}'"
    if pipeline is not None:
        query += f" and tags.`{PIPELINE_TAG}` = '{pipeline}'"
    runs = client.search_runs(experiment_ids, query, order_by=["attributes.start_time DESC"])
    exp_name = os.environ.get("DVC_EXP_NAME")
    same = [r for r in runs if exp_name and r.data.tags.get("dvc.exp_name") == exp_name]
    return (same or runs or [None])[0]


def pipeline_tags(pipeline: Pipeline) -> dict[str, str]:
    """The parent run's tags (besides its key and role)."""
    return {**pipeline.tags, spool.PIPELINE_LABEL_TAG: pipeline.label}


def own_artifact_location(root: Path) -> str | None:
    """Our own store keeps artifacts beside mlflow.db; a user's store uses its default."""
    return None if os.environ.get("MLFLOW_TRACKING_URI") else artifact_root(root).as_uri()


def _reap_dead_runs(client: Any, experiment_id: str) -> None:
    """Runs of this host left RUNNING by a process that is gone (killed, out of memory)
    end FAILED, so that no run stays RUNNING forever."""
    from mlflow.entities import RunTag

    host = socket.gethostname().replace("'", "")
    runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING' and "
                              f"tags.`clipid.host` = '{host}'")
    for run in runs:
        pid = run.data.tags.get("clipid.pid", "")
        if pid.isdigit() and not spool.pid_alive(int(pid), host):
            log.warning("MLflow run %s (%s) was left RUNNING by process %s, which is gone: "
                        "marking it FAILED", run.info.run_id, run.info.run_name, pid)
            client.log_batch(run.info.run_id, tags=[RunTag("clipid.ended", "process died")])
            client.set_terminated(run.info.run_id, status="FAILED")


def find_runs(stage: str | None = None, root: Path | None = None) -> list[Any]:
    """Runs of the clipid experiment in this repository's store, newest first."""
    client = mlflow_client(tracking_uri(root))
    experiment = client.get_experiment_by_name(
        os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
    if experiment is None:
        return []
    query = f"tags.`clipid.stage` = '{stage}'" if stage else ""
    return list(client.search_runs([experiment.experiment_id], filter_string=query,
                                   order_by=["attributes.start_time DESC"]))


def open_store(uri: str, experiment: str, location: str | None) -> tuple[Any, str]:
    """A client of the store at ``uri`` and the id of ``experiment`` in it (retried)."""
    _check_reachable(uri)
    client = with_retries(mlflow_client, uri)
    return client, with_retries(_get_or_create_experiment, client, experiment, location)


def replay_spool(client: Any, root: Path, uri: str | None, wait: bool = True
                 ) -> list[tuple[spool.SpoolEntry, str]]:
    """Replay the spooled runs, then reconcile the spooled pipeline views, into ``client``'s
    store: those meant for ``uri``, or all of them (``None``: ``clipid tracking sync``, which
    gives a run meant for another store this store's artifact location)."""
    from clipid.reconcile import replay_pending

    here = tracking_uri(root) if uri is None else uri

    def experiment_id(name: str, location: str | None, meant_for: str) -> str:
        if meant_for != here:
            location = own_artifact_location(root)
        return _get_or_create_experiment(client, name, location)

    def views() -> None:
        for snap, changes in replay_pending(client, root, experiment_id, only_uri=uri):
            log.info("MLflow: reconciled the spooled view of %s (%d changes)", snap.label,
                     len(changes))

    done = spool.sync(client, root, lambda r: experiment_id(r.experiment, r.artifact_location,
                                                            r.uri), only_uri=uri, wait=wait,
                      then=views)
    for entry, run_id in done:
        log.info("MLflow: replayed spooled run %s as %s", entry.record.run_name, run_id)
    return done


def sync_spool(root: Path | None = None) -> list[tuple[spool.SpoolEntry, str]]:
    """``clipid tracking sync``: replay every pending spooled run into the current store
    (``MLFLOW_TRACKING_URI`` or this repository's), whichever store it was meant for."""
    root = root or store_root()
    uri = tracking_uri(root)
    _check_reachable(uri)
    return replay_spool(with_retries(mlflow_client, uri), root, None)


def spool_status(root: Path | None = None) -> list[str]:
    """``clipid tracking status``: one line per pending spooled run."""
    lines = []
    for entry in spool.pending(root or store_root()):
        record = entry.record
        state = "in progress" if entry.live else record.status
        lines.append(f"{record.id}  {spool.format_time(record.start_time)}  {record.run_name:<16} "
                     f"{state:<11}  {len(record.metrics):>5} metric values  "
                     f"{len(record.artifacts):>2} artifacts  meant for {record.uri}  "
                     f"({record.error})")
    return lines
