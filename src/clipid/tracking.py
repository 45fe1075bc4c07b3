"""MLflow tracking: one run per stage execution, in one store per repository.

The store is ``MLFLOW_TRACKING_URI`` when set, otherwise ``sqlite:///<root>/mlflow.db`` with
artifacts in ``<root>/mlruns``. ``<root>`` is ``DVC_ROOT``, which DVC sets for every stage
command, also in ``dvc exp run --temp`` and queued experiments that run in a copy of the
repository: their runs land in the workspace's store. Tracking never stops the pipeline: a store
that cannot be reached gives one warning and the run goes on untracked.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from clipid.config import Params, flatten_params

log = logging.getLogger(__name__)

__all__ = ["Tracker", "store_root", "tracking_uri", "ui_command"]

EXPERIMENT = "clipid"
# Quiet and quick by default; a user's own settings win.
_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
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
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root or store_root()) / 'mlflow.db'}"


def ui_command(host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The ``mlflow ui`` command line that browses this repository's store."""
    root = store_root()
    return ["mlflow", "ui", "--backend-store-uri", tracking_uri(root),
            "--default-artifact-root", (root / "mlruns").as_uri(),
            "--host", host, "--port", str(port)]


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _metric_name(name: str) -> str:
    """MLflow allows letters, digits and ``_ - . space / :``; anything else becomes ``_``."""
    return re.sub(r"[^\w\-. /:]", "_", name)


class Tracker:
    """One MLflow run, as a context manager. ``run_id`` reopens an existing run (the
    evaluation stage logs into the run that trained the model).

    Every method is a no-op once tracking has failed, after a single warning.
    """

    def __init__(self, stage: str, params: Params, run_name: str | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None):
        self.stage, self.params, self.run_name = stage, params, run_name or stage
        self.extra_tags = tags or {}
        self.resume_id = run_id
        self._mlflow: Any = None
        self._run: Any = None
        self.uri = ""

    @property
    def run_id(self) -> str | None:
        return self._run.info.run_id if self._run is not None else None

    @property
    def active(self) -> bool:
        return self._run is not None

    def _disable(self, error: BaseException) -> None:
        warnings.warn(f"MLflow tracking at {self.uri} failed ({type(error).__name__}: "
                      f"{error}); the pipeline goes on without tracking", stacklevel=3)
        self._run = None

    def __enter__(self) -> Tracker:
        for key, value in _ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        root = store_root()
        self.uri = tracking_uri(root)
        # Read before mlflow.set_tracking_uri, which exports MLFLOW_TRACKING_URI itself.
        own_store = not os.environ.get("MLFLOW_TRACKING_URI")
        try:
            import mlflow  # slow to import: only stages that track pay for it

            self._mlflow = mlflow
            mlflow.set_tracking_uri(self.uri)
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
            experiment = mlflow.get_experiment_by_name(experiment_name)
            if experiment is None:
                location = (root / "mlruns").as_uri() if own_store else None
                experiment_id = mlflow.create_experiment(experiment_name,
                                                         artifact_location=location)
            else:
                experiment_id = experiment.experiment_id
            if self.resume_id:
                try:
                    self._run = mlflow.start_run(run_id=self.resume_id)
                except mlflow.exceptions.MlflowException:
                    # A checkpoint trained against another store: log into a run of its own.
                    log.warning("MLflow run %s is not in %s; starting a new run",
                                self.resume_id, self.uri)
                    self.resume_id = None
            if self._run is None:
                self._run = mlflow.start_run(experiment_id=experiment_id,
                                             run_name=self.run_name)
                self._log_params()
            self.set_tags(self._tags(root))
        except Exception as error:  # any tracking failure: training goes on
            self._disable(error)
        return self

    def _tags(self, root: Path) -> dict[str, str]:
        params = self.params
        commit = _git_commit(root)
        tags = {
            "clipid.stage": self.stage,
            "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "dvc.exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
            "git.commit": commit or "",
            "data.source": params.data.source,
            "model.name": params.model.name,
            "model.pretrained": params.model.pretrained or "random",
        }
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if self.resume_id:  # an evaluation reopening a training run keeps that run's stage
            tags = {"clipid.eval_stage": self.stage}
        return {**{k: v for k, v in tags.items() if v}, **self.extra_tags}

    def _log_params(self) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)) for k, v in sorted(flatten_params(self.params).items())]
        client = self._mlflow.MlflowClient()
        for start in range(0, len(flat), 100):  # MLflow takes at most 100 params per call
            client.log_batch(self.run_id, params=flat[start:start + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            try:
                self._mlflow.set_tags(tags)
            except Exception as error:
                self._disable(error)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        clean = {_metric_name(k): float(v) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))}
        try:
            self._mlflow.log_metrics(clean, step=step)
        except Exception as error:
            self._disable(error)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        try:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)
        except Exception as error:
            self._disable(error)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.active:
            return
        try:
            self._mlflow.end_run(status="FAILED" if exc_type is not None else "FINISHED")
        except Exception as error:
            self._disable(error)
        self._run = None
