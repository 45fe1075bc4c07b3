"""MLflow tracking: one run per stage execution, in one store per repository.

The store is ``MLFLOW_TRACKING_URI`` when set, otherwise ``sqlite:///<root>/mlflow.db`` with
artifacts in ``<root>/mlruns``. ``<root>`` is ``DVC_ROOT``, which DVC sets for every stage
command and points at the workspace also for ``dvc exp run --temp`` and queued experiments that
run in a copy of the repository, so their runs land in the workspace's store.

Tracking never stops the pipeline: a store that cannot be reached, or any error from MLflow,
gives one warning and the stage goes on untracked.

Everything goes through an explicit ``MlflowClient``, never MLflow's fluent API: that API keeps
a process-wide active run and exports ``MLFLOW_TRACKING_URI`` into ``os.environ``, which would
leak one store into the next ``Tracker`` of the same process (tests, notebooks).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import socket
import subprocess
import time
import urllib.request
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

from clipid.config import Params, flatten_params
from clipid.models.checkpoint import sidecar_path

log = logging.getLogger(__name__)

__all__ = ["EXPERIMENT", "Tracker", "find_runs", "store_root", "tracking_uri", "ui_command"]

EXPERIMENT = "clipid"
_MAX_PARAMS_PER_CALL = 100     # MLflow's log_batch limit for params
_MAX_METRICS_PER_CALL = 1000   # ... and for metrics
_MAX_PARAM_VALUE = 6000        # longest param value MLflow stores
_CONNECT_TIMEOUT_S = 3.0       # up-front reachability probe of an HTTP server
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
    """The ``mlflow ui`` command line that browses this repository's store."""
    root = store_root()
    return ["mlflow", "ui", "--backend-store-uri", tracking_uri(root),
            "--default-artifact-root", str(artifact_root(root)),
            "--host", host, "--port", str(port)]


def _mlflow_client(uri: str) -> Any:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient  # slow to import (~2-3 s): only stages that track pay

    return MlflowClient(tracking_uri=uri)


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

    ``run_id`` reopens an existing run instead of starting one (the evaluation stage logs into
    the run that trained the model); a reopened run keeps its status and its params. Every
    method is a no-op once tracking has failed, after a single warning, and when ``enabled``
    is false (the processes other than rank 0 of a distributed run).
    """

    def __init__(self, stage: str, params: Params, run_name: str | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None,
                 enabled: bool = True) -> None:
        self.stage = stage
        self.enabled = enabled
        self.params = params
        self.run_name = run_name or stage
        self.extra_tags = dict(tags or {})
        self.resume_id = run_id
        self.uri = ""
        self._client: Any = None
        self._run_id: str | None = None
        self._resumed = False
        self._warned_metrics = False

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def active(self) -> bool:
        return self._run_id is not None

    # ---------------------------------------------------------------------------------------
    # start and end

    def __enter__(self) -> Tracker:
        if not self.enabled:
            return self
        root = store_root()
        self.uri = tracking_uri(root)
        try:
            self._start(root)
        except Exception as error:  # any tracking failure: the stage goes on untracked
            self._disable(error)
        return self

    def _start(self, root: Path) -> None:
        _check_reachable(self.uri)
        self._client = client = _mlflow_client(self.uri)
        if self.resume_id and self._resume(client):
            self._set_tags({"clipid.eval_stage": self.stage, **self.extra_tags})
            return
        own_store = not os.environ.get("MLFLOW_TRACKING_URI")
        # Our own store keeps artifacts beside mlflow.db; a user's store uses its own default.
        location = artifact_root(root).as_uri() if own_store else None
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        experiment_id = _get_or_create_experiment(client, name, location)
        run = client.create_run(experiment_id, run_name=self.run_name, tags=self._tags(root))
        self._run_id = run.info.run_id
        self._log_params()

    def _resume(self, client: Any) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(self.resume_id)
        except MlflowException:
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            # A checkpoint trained against another store: log into a run of its own.
            log.warning("MLflow run %s is not in %s; starting a new run", self.resume_id,
                        self.uri)
            return False
        self._run_id, self._resumed = run.info.run_id, True
        return True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.active:
            return
        if not self._resumed:  # a reopened training run keeps its own status
            if exc_type is None:
                status = "FINISHED"
            elif issubclass(exc_type, KeyboardInterrupt):
                status = "KILLED"
            else:
                status = "FAILED"
            self._call(self._client.set_terminated, self._run_id, status=status)
        self._run_id = None  # never swallow the exception: return None

    def _disable(self, error: BaseException) -> None:
        warnings.warn(f"MLflow tracking at {self.uri} failed ({type(error).__name__}: "
                      f"{error}); the stage goes on without tracking", stacklevel=3)
        run_id, self._run_id = self._run_id, None
        if run_id is not None and not self._resumed:
            # Best effort: don't leave a half-logged run RUNNING forever.
            with contextlib.suppress(Exception):
                self._client.set_terminated(run_id, status="FAILED")

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        if not self.active:
            return
        try:
            fn(*args, **kwargs)
        except Exception as error:
            self._disable(error)

    # ---------------------------------------------------------------------------------------
    # what a run holds

    def _tags(self, root: Path) -> dict[str, str]:
        params = self.params
        commit = _git_commit(root)
        tags = {
            "clipid.stage": self.stage,
            "dvc.stage": os.environ.get("DVC_STAGE", ""),
            "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "dvc.exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
            "git.commit": commit or "",
            "mlflow.source.git.commit": commit or "",
            "data.source": params.data.source,
            "model.name": params.model.name,
            "model.pretrained": params.model.pretrained or "random",
        }
        return {**{k: v for k, v in tags.items() if v}, **self.extra_tags}

    def _log_params(self) -> None:
        from mlflow.entities import Param

        flat = [Param(key, str(value)[:_MAX_PARAM_VALUE])
                for key, value in sorted(flatten_params(self.params).items())]
        for start in range(0, len(flat), _MAX_PARAMS_PER_CALL):
            self._client.log_batch(self._run_id, params=flat[start:start + _MAX_PARAMS_PER_CALL])

    def _set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self._run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._call(self._set_tags, tags)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics; NaN, inf and non-numbers are skipped (MLflow's UI can't plot
        them and a stray string must not stop training)."""
        if not self.active:
            return
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
        if clean:
            self._call(self._log_metrics, clean, step)

    def _log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step or 0) for k, v in metrics.items()]
        for start in range(0, len(batch), _MAX_METRICS_PER_CALL):
            self._client.log_batch(self._run_id,
                                   metrics=batch[start:start + _MAX_METRICS_PER_CALL])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(lambda: self._client.log_artifact(self._run_id, str(path), artifact_path))

    def log_checkpoint(self, checkpoint: Path, seconds: float) -> None:
        """What a training stage made: its training time, the sidecar and, unless
        ``mlflow.log_checkpoints`` is false, the weights as a registered MLflow Model."""
        self.log_metrics({"train_seconds": seconds})
        if self.params.mlflow.log_checkpoints and self.active:
            from clipid.deploy.registry import holds_clip_model, log_checkpoint_model

            if holds_clip_model(checkpoint):
                self._call(log_checkpoint_model, self._client, self._run_id, checkpoint,
                           self.run_name)
            else:  # not a model (CLIP-ReID's prompts): the file itself
                self.log_artifact(checkpoint, "checkpoint")
        self.log_artifact(sidecar_path(checkpoint), "checkpoint")

    def log_model(self, clip: Any, stage: str) -> None:
        """The MLflow Model of ``clip`` (clipid.deploy), registered as clipid-image/-text; the
        weights go to the store once, inside it. Skipped with ``mlflow.log_checkpoints: false``."""
        if self.params.mlflow.log_checkpoints and self.active:
            from clipid.deploy.registry import log_stage_model

            self._call(log_stage_model, self._client, self._run_id, clip, stage)

    def log_dict(self, dictionary: dict[str, Any], artifact_file: str) -> None:
        self._call(lambda: self._client.log_dict(self._run_id, dictionary, artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(lambda: self._client.log_text(self._run_id, text, artifact_file))


def find_runs(stage: str | None = None, root: Path | None = None) -> list[Any]:
    """Runs of the clipid experiment in this repository's store, newest first."""
    client = _mlflow_client(tracking_uri(root))
    experiment = client.get_experiment_by_name(
        os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
    if experiment is None:
        return []
    query = f"tags.`clipid.stage` = '{stage}'" if stage else ""
    return list(client.search_runs([experiment.experiment_id], filter_string=query,
                                   order_by=["attributes.start_time DESC"]))
