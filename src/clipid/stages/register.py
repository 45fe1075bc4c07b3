"""Stage ``register``: move alias ``champion`` of clipid-image and clipid-text to the version of
the pipeline's best stage (image-to-image mAP, text-to-image mAP), or, by the champion policy
(``mlflow.promote``, :mod:`clipid.deploy.promotion`), the pipeline's candidate alias.

Its DVC output ``metrics/register.json`` names the champion stages and their figures, decided by
the metrics alone, so it is the same on every machine; the alias and the versions it moved
(which differ per branch and store) are only printed and kept in the registry.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from clipid.config import Params
from clipid.deploy.promotion import current_alias
from clipid.deploy.registry import Champion, best_stages, move_champions, stage_digest
from clipid.workspace import Workspace

log = logging.getLogger(__name__)


def _write(champions: list[Champion], out: Path) -> None:
    content = {c.model: {"stage": c.stage, c.metric: round(c.value, 6)} for c in champions}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def register_stage(params: Params, stages: list[str], workspace: Workspace | None = None
                   ) -> dict[str, str | None]:
    """Returns ``{registered model: version now holding the pipeline's alias, or None}``."""
    from clipid import tracking

    workspace = workspace or Workspace()
    champions = best_stages(stages, workspace)
    _write(champions, workspace.register_metrics)
    alias = current_alias(params.mlflow)
    if not params.mlflow.log_checkpoints:
        print(f"register: mlflow.log_checkpoints is false, so no stage logged a model; "
              f"'{alias}' not moved")
        return {c.model: None for c in champions}
    digests = {c.stage: stage_digest(params, c.stage, workspace) for c in champions}
    uri = tracking.tracking_uri()
    try:
        tracking._check_reachable(uri)
        client = tracking.mlflow_client(uri)
        moved = move_champions(client, champions, digests, alias)
    except Exception as error:  # noqa: BLE001 - the registry must not stop the pipeline
        print(f"register: the MLflow store at {uri} could not be reached or failed "
              f"({type(error).__name__}: {error}); '{alias}' not moved")
        return {c.model: None for c in champions}
    for champion in champions:
        version = moved[champion.model]
        where = f"version {version}" if version else "not moved (no version of that stage)"
        print(f"register: {champion.model}@{alias} {where}: {champion.stage}, "
              f"{champion.metric} {champion.value:.4f}")
    return moved
