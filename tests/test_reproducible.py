"""Reproducible is byte-identical: the micro pipeline rebuilt in another clone gives the same
dvc.lock, metrics/ and models/, and a clone that shares the DVC cache checks out instead of
training."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from test_mlflow_view import outputs
from test_pipeline import sh as pipeline_sh

from conftest import MicroBuild, MicroRebuild
from conftest import micro_clone as clone

TRAINING = ("train_stage2", "train_stage3", "train_stage4", "clipreid_prompts", "clipreid_image")


def sh(cwd: Path, *cmd: str) -> str:
    """test_pipeline's ``sh`` with room for a whole ``dvc repro`` on a busy machine."""
    return pipeline_sh(cwd, *cmd, timeout=3600)


@pytest.fixture(scope="module")
def built(micro_built: MicroBuild, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[Path, Path]:
    """``(origin, shared cache)``: a bare repository holding the micro pipeline, whose first
    clone ran ``dvc repro`` (its cache in ``shared cache``) and pushed dvc.lock and metrics/
    (a copy of the session's micro build, so that its own origin stays without them)."""
    base = tmp_path_factory.mktemp("repro")
    origin = base / "origin.git"
    shutil.copytree(micro_built.origin, origin)
    first = base / "first"
    shutil.copytree(micro_built.first, first, symlinks=True)
    sh(first, "git", "remote", "set-url", "origin", str(origin))
    sh(first, "git", "add", "-A")  # dvc.lock, metrics/ and the .gitignore files DVC wrote
    sh(first, "git", "commit", "-qm", "repro")
    sh(first, "git", "push", "-q", "origin", "HEAD")
    return origin, micro_built.cache


@pytest.mark.slow
def test_a_rebuild_in_another_clone_gives_the_same_bytes(micro_rebuilt: MicroRebuild,
                                                         micro_built: MicroBuild,
                                                         tmp_path: Path) -> None:
    # The run's rebuild: another clone, a cache of its own, the MLflow store out of reach.
    # (Asked for first: while this worker builds it, test_mlflow_view's builds micro_built.)
    second = micro_rebuilt.clone
    assert all(f"Running stage '{stage}'" in micro_rebuilt.out for stage in TRAINING)
    # dvc.lock, metrics/ and models/ as the first clone made them, byte for byte.
    assert outputs(second) == outputs(micro_built.first)

    # Lineage: the weights lead to this clone's run, its commit and its parent's run.
    head = sh(second, "git", "rev-parse", "HEAD").strip()
    lineage = sh(second, "clipid", "lineage", "stage3")
    assert lineage.count(head) == 2 and "start of the line" in lineage
    assert "parent models/stage2/model.safetensors" in lineage
    wren = tmp_path / "wren"  # a copy: the rebuild stays as it is for test_mlflow_view
    shutil.copytree(second, wren, symlinks=True)
    sh(wren, "dvc", "exp", "run", "-n", "lineage-wren", "-S", "train.lr=2e-3", "train_stage2")
    lineage = sh(wren, "clipid", "lineage", "models/stage2/model.safetensors")
    assert "dvc exp     lineage-wren" in lineage and head in lineage


@pytest.mark.slow
def test_a_clone_sharing_the_dvc_cache_runs_no_stage(built: tuple[Path, Path]) -> None:
    origin, cache = built
    third = clone(origin, origin.parent / "third", cache)
    # Python's bytecode next to the sources, which importing them writes wherever
    # PYTHONDONTWRITEBYTECODE is not set: the stages' source folders stay as dvc.lock has them.
    sh(third, sys.executable, "-m", "compileall", "-q", "src")
    assert list((third / "src" / "clipid" / "models").glob("__pycache__/*.pyc"))
    out = sh(third, "dvc", "repro")
    # The fingerprint and track (always_changed) run on every repro; nothing else does: every
    # other stage's outputs come from the shared cache.
    assert re.findall(r"Running stage '([^']+)'", out) == ["fingerprint", "track"]
    assert (third / "models" / "stage4" / "model.safetensors").is_file()
    assert sh(third, "git", "status", "--porcelain") == ""
