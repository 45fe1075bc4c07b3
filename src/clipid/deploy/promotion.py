"""The champion policy: which alias a pipeline's best versions get, the production alias
``champion`` or a candidate alias of their own (README: Team setup).

On a store many people share, every ``register`` used to move ``champion``, so the last
experiment of anyone won. ``mlflow.promote: auto`` keeps ``champion`` to a ``dvc repro`` on
``mlflow.production_branch`` (no DVC experiment) there, and to every pipeline on the
repository's own store (one person: nobody else's work to overwrite); ``always`` and ``never``
say so. Every other pipeline sets ``candidate-<experiment or branch>``. ``register`` and
``track`` decide with :func:`promotion_alias`; the alias never goes into a DVC output (it
depends on the branch and the store, not on the pipeline's files).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from clipid.config import MlflowParams
from clipid.deploy import CHAMPION
from clipid.tracking import store_root
from clipid.tracking_pipeline import git_output

__all__ = ["CANDIDATE_PREFIX", "candidate_alias", "decide_alias", "promotion_alias"]

CANDIDATE_PREFIX = "candidate-"
_MAX_ALIAS = 255  # MLflow's limit; its aliases are letters, digits, '_' and '-'


def candidate_alias(name: str) -> str:
    """``candidate-<name>`` in MLflow's alias characters (``feature/x`` -> ``feature-x``)."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "unnamed"
    return (CANDIDATE_PREFIX + clean)[:_MAX_ALIAS]


def decide_alias(promote: str, production_branch: str, exp_name: str, branch: str | None,
                 shared: bool, commit: str = "") -> str:
    """The alias of a pipeline: ``exp_name`` of its DVC experiment ('' for none), ``branch``
    its git branch (None on a detached HEAD, then named by its ``commit``), ``shared`` whether
    the store is not the repository's own."""
    production = not exp_name and branch == production_branch
    if promote == "always" or (promote == "auto" and (production or not shared)):
        return CHAMPION
    return candidate_alias(exp_name or branch or commit or "detached")


def promotion_alias(params: MlflowParams, root: Path | None = None) -> str:
    """The alias for the pipeline this process belongs to (``root``: its git workspace)."""
    root = root or store_root()
    return decide_alias(params.promote, params.production_branch,
                        os.environ.get("DVC_EXP_NAME", ""),
                        git_output(root, "symbolic-ref", "--short", "-q", "HEAD") or None,
                        bool(os.environ.get("MLFLOW_TRACKING_URI")),
                        git_output(root, "rev-parse", "--short", "HEAD") or "")
