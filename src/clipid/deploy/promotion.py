"""The champion policy: which alias a pipeline's best versions get, the production alias
``champion`` or a candidate alias of their own (README: Team setup).

On a store many people share, every ``register`` used to move ``champion``, so the last
experiment of anyone won. ``mlflow.promote: auto`` keeps ``champion`` to a ``dvc repro`` on
``mlflow.production_branch`` (no DVC experiment) there, and to every pipeline on the
repository's own store (one person: nobody else's work to overwrite); ``always`` and ``never``
say so. Every other pipeline sets ``candidate-<experiment or branch>``. ``register`` and
``track`` (also when it replays a spooled view) decide with :func:`decide_alias`; the alias never
goes into a DVC output (it depends on the branch and the store, not on the pipeline's files).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from clipid.config import MlflowParams
from clipid.deploy import CHAMPION
from clipid.tracking import store_root
from clipid.tracking_pipeline import git_output

__all__ = ["CANDIDATE_PREFIX", "candidate_alias", "current_alias", "decide_alias",
           "git_branch", "promotion_alias"]

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
    return candidate_alias(exp_name or branch or commit[:7] or "workspace")


def promotion_alias(params: MlflowParams, exp_name: str, branch: str | None,
                    commit: str = "") -> str:
    """The alias of a pipeline (as :func:`decide_alias`) in the store this process writes:
    a shared one when ``MLFLOW_TRACKING_URI`` is set (a spooled view decides when it is
    replayed, into whichever store that is)."""
    return decide_alias(params.promote, params.production_branch, exp_name, branch,
                        bool(os.environ.get("MLFLOW_TRACKING_URI")), commit)


def git_branch(root: Path) -> str | None:
    """The branch checked out in ``root``; None on a detached HEAD or outside git."""
    return git_output(root, "symbolic-ref", "--short", "-q", "HEAD") or None


def current_alias(params: MlflowParams, root: Path | None = None) -> str:
    """The alias of the pipeline this process belongs to (``root``: its git workspace)."""
    root = root or store_root()
    return promotion_alias(params, os.environ.get("DVC_EXP_NAME", ""), git_branch(root),
                           git_output(root, "rev-parse", "HEAD") or "")
