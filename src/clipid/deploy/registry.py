"""The Model Registry: a version of ``clipid-image`` (and ``clipid-text``) per training run, and
the ``champion`` alias on the version of the pipeline's best stage.

A stage's version is found by the SHA-256 of its weights (tag ``clipid.weights_sha256``), which
the pipeline's own files determine (``models/<stage>/model.safetensors``, or the pretrained
model recreated for Stage 1): no run id or version number ever goes into a DVC output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipid.config import Params
from clipid.deploy import CHAMPION, IMAGE_MODEL, TEXT_MODEL
from clipid.errors import ClipidError
from clipid.files import file_sha256
from clipid.stage_registry import get_stage
from clipid.workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["Champion", "best_stages", "drop_duplicate_versions", "holds_clip_model",
           "log_checkpoint_model", "log_stage_model", "move_champions", "registered_versions",
           "stage_digest"]

SHA_TAG = "clipid.weights_sha256"
STAGE_TAG = "clipid.stage"
# Which metric crowns the champion of each registered model: (metrics block, key).
CRITERIA = {IMAGE_MODEL: ("i2i", "mAP"), TEXT_MODEL: ("t2i", "mAP")}


@dataclass(frozen=True)
class Champion:
    model: str       # registered model name
    stage: str       # the stage with the best figure
    metric: str      # e.g. "i2i/mAP"
    value: float


def _ensure_registered(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="clipid embeddings; the alias "
                                           f"'{CHAMPION}' is the pipeline's best stage")
        except MlflowException:  # created meanwhile by a parallel stage
            client.get_registered_model(name)


def log_stage_model(client: Any, run_id: str, clip: Any, stage: str) -> dict[str, str]:
    """Log the MLflow Model of ``clip`` into run ``run_id`` and register it as a new version of
    clipid-image (and clipid-text where it has a text tower); returns ``{name: version}``."""
    from clipid.deploy.pyfunc import ARTIFACT_PATH, save_pyfunc
    from clipid.search.query import has_text_tower

    has_text = has_text_tower(clip.model)
    with tempfile.TemporaryDirectory(prefix="clipid-model-") as tmp:
        digest = save_pyfunc(clip, stage, Path(tmp) / ARTIFACT_PATH, has_text)
        client.log_artifacts(run_id, str(Path(tmp) / ARTIFACT_PATH), ARTIFACT_PATH)
    client.set_tag(run_id, SHA_TAG, digest)  # the run's model, found by its weights
    source = f"{client.get_run(run_id).info.artifact_uri}/{ARTIFACT_PATH}"
    versions = {}
    for name in (IMAGE_MODEL, TEXT_MODEL) if has_text else (IMAGE_MODEL,):
        _ensure_registered(client, name)
        version = client.create_model_version(name, source, run_id=run_id,
                                               tags={STAGE_TAG: stage, SHA_TAG: digest})
        versions[name] = str(version.version)
        log.info("%s: registered %s version %s", stage, name, version.version)
    return versions


def holds_clip_model(checkpoint: Path) -> bool:
    """Whether a checkpoint holds a CLIP model (not, e.g., CLIP-ReID's learnt prompts)."""
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as weights:
        return any(key.startswith("visual.") for key in weights.keys())  # noqa: SIM118


def log_checkpoint_model(client: Any, run_id: str, checkpoint: Path, stage: str
                         ) -> dict[str, str]:
    """:func:`log_stage_model` of the model in ``checkpoint``, unless the registry holds these
    weights already (a deterministic rebuild, a stage DVC restored in another experiment): one
    version per distinct weights, which the run is tagged with."""
    from clipid.models.factory import load_model

    digest = file_sha256(checkpoint)
    known = registered_versions(client, digest)
    if known:
        client.set_tag(run_id, SHA_TAG, digest)
        log.info("%s: weights registered already (%s)", stage,
                 ", ".join(f"{n} version {v}" for n, v in known.items()))
        return known
    versions = log_stage_model(client, run_id, load_model(checkpoint), stage)
    drop_duplicate_versions(client, digest)
    return versions


def drop_duplicate_versions(client: Any, digest: str) -> None:
    """Two processes that registered the same weights at once (parallel experiments that both
    restored a stage): the oldest version stays, the others go."""
    from mlflow.exceptions import MlflowException

    for name in (IMAGE_MODEL, TEXT_MODEL):
        try:
            versions = sorted(int(v.version) for v in client.search_model_versions(
                f"name = '{name}'") if v.tags.get(SHA_TAG) == digest)
        except MlflowException:
            continue
        for extra in versions[1:]:
            with contextlib.suppress(MlflowException):  # the other process deleted it first
                client.delete_model_version(name, str(extra))


def registered_versions(client: Any, digest: str) -> dict[str, str]:
    """``{registered model: newest version holding weights digest}``."""
    from mlflow.exceptions import MlflowException

    found = {}
    for name in (IMAGE_MODEL, TEXT_MODEL):
        try:
            version = _version_of(client, name, digest)
        except MlflowException:  # no such registered model yet
            version = None
        if version is not None:
            found[name] = version
    return found


def stage_digest(params: Params, stage: str, workspace: Workspace | None = None
                 ) -> str | None:
    """SHA-256 of the weights the stage's MLflow Model holds; None when the stage has none."""

    if not get_stage(stage).is_pretrained:
        checkpoint = (workspace or Workspace()).weights(stage)
        return file_sha256(checkpoint) if checkpoint.is_file() else None
    from clipid.deploy.pyfunc import weights_file
    from clipid.models.stages import model_for_stage

    clip = model_for_stage(params, stage)  # recreated as Stage 1 made it
    with tempfile.TemporaryDirectory(prefix="clipid-digest-") as tmp:
        return file_sha256(weights_file(clip, Path(tmp)))


def best_stages(stages: list[str], workspace: Workspace | None = None) -> list[Champion]:
    """The stage with the best figure for each registered model, first stage winning ties.
    Stages without the figure (no text tower, no t2i) don't compete."""
    workspace = workspace or Workspace()
    figures = {}
    for stage in stages:
        path = workspace.stage_metrics(stage)
        if not path.is_file():
            raise ClipidError(f"{path}: not found; run the evaluation of {stage} first")
        figures[stage] = json.loads(path.read_text(encoding="utf-8"))
    champions = []
    for name, (block, key) in CRITERIA.items():
        scored = [(float(figures[s][block][key]), -i, s) for i, s in enumerate(stages)
                  if isinstance(figures[s].get(block), dict) and key in figures[s][block]]
        if scored:
            value, _, stage = max(scored)
            champions.append(Champion(name, stage, f"{block}/{key}", value))
    return champions


def _version_of(client: Any, name: str, digest: str) -> str | None:
    """The newest version of ``name`` holding weights ``digest``."""
    versions = [v for v in client.search_model_versions(f"name = '{name}'")
                if v.tags.get(SHA_TAG) == digest]
    return max((str(v.version) for v in versions), key=int, default=None)


def move_champions(client: Any, champions: list[Champion], digests: dict[str, str | None],
                   alias: str = CHAMPION) -> dict[str, str | None]:
    """Point ``alias`` (``champion``, or a candidate alias: :mod:`clipid.deploy.promotion`) of
    each model at its champion stage's version; a champion without a version (not logged, or
    logged to another store) leaves the alias as it is."""
    from mlflow.exceptions import MlflowException

    moved: dict[str, str | None] = {}
    for champion in champions:
        digest = digests.get(champion.stage)
        version = None
        if digest is not None:
            try:
                version = _version_of(client, champion.model, digest)
            except MlflowException:
                version = None  # no such registered model yet
        if version is None:
            log.warning("%s: %s (best %s %.4f) has no registered version in this store; alias "
                        "'%s' not moved", champion.model, champion.stage, champion.metric,
                        champion.value, alias)
        else:
            client.set_registered_model_alias(champion.model, alias, version)
            log.info("%s@%s -> version %s (%s, %s %.4f)", champion.model, alias, version,
                     champion.stage, champion.metric, champion.value)
        moved[champion.model] = version
    return moved
