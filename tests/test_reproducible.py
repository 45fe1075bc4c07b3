"""Reproducible is byte-identical: the micro pipeline rebuilt in another clone gives the same
dvc.lock and metrics/, and a clone that shares the DVC cache checks out instead of training."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_pipeline import sh as pipeline_sh
from test_pipeline import write_micro_pipeline

TRAINING = ("train_stage2", "train_stage3", "train_stage4", "clipreid_prompts", "clipreid_image")


def sh(cwd: Path, *cmd: str) -> str:
    """test_pipeline's ``sh`` with room for a whole ``dvc repro`` on a busy machine."""
    return pipeline_sh(cwd, *cmd, timeout=3600)


def clone(origin: Path, dest: Path, cache: Path | None = None) -> Path:
    sh(origin.parent, "git", "clone", "-q", str(origin), str(dest))
    sh(dest, "git", "config", "user.email", "test@example.com")
    sh(dest, "git", "config", "user.name", "clipid test")
    if cache is not None:
        sh(dest, "dvc", "config", "--local", "cache.dir", str(cache))
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(origin, shared cache)``: a bare repository holding the micro pipeline, whose first
    clone ran ``dvc repro`` (its cache in ``shared cache``) and pushed dvc.lock and metrics/."""
    base = tmp_path_factory.mktemp("repro")
    seed = write_micro_pipeline(base / "seed")
    sh(seed, "git", "init", "-q")
    sh(seed, "dvc", "init", "-q")
    sh(seed, "dvc", "config", "core.analytics", "false")
    sh(seed, "git", "add", "-A")
    sh(seed, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "micro")
    origin = base / "origin.git"
    sh(base, "git", "clone", "-q", "--bare", str(seed), str(origin))

    cache = base / "shared-cache"
    first = clone(origin, base / "first", cache)
    sh(first, "dvc", "repro")
    sh(first, "git", "add", "-A")  # dvc.lock, metrics/ and the .gitignore files DVC wrote
    sh(first, "git", "commit", "-qm", "repro")
    sh(first, "git", "push", "-q", "origin", "HEAD")
    return origin, cache


@pytest.mark.slow
def test_a_rebuild_in_another_clone_gives_the_same_bytes(built: tuple[Path, Path],
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    origin, _ = built
    second = clone(origin, origin.parent / "second")  # a cache of its own: it trains again
    out = sh(second, "dvc", "repro")
    assert all(f"Running stage '{stage}'" in out for stage in TRAINING)
    # dvc.lock and metrics/ as committed by the first clone: nothing left to commit.
    assert sh(second, "git", "status", "--porcelain") == ""

    # Lineage: the weights lead to this clone's run, its commit and its parent's run.
    head = sh(second, "git", "rev-parse", "HEAD").strip()
    lineage = sh(second, "clipid", "lineage", "stage3")
    assert lineage.count(head) == 2 and "start of the line" in lineage
    assert "parent models/stage2/model.safetensors" in lineage
    sh(second, "dvc", "exp", "run", "-n", "lineage-wren", "-S", "train.lr=2e-3", "train_stage2")
    lineage = sh(second, "clipid", "lineage", "models/stage2/model.safetensors")
    assert "dvc exp     lineage-wren" in lineage and head in lineage


@pytest.mark.slow
def test_a_clone_sharing_the_dvc_cache_runs_no_stage(built: tuple[Path, Path]) -> None:
    origin, cache = built
    third = clone(origin, origin.parent / "third", cache)
    out = sh(third, "dvc", "repro")
    # The fingerprint (always_changed) lists the data source on every repro; nothing else runs:
    # every other stage's outputs come from the shared cache.
    assert re.findall(r"Running stage '([^']+)'", out) == ["fingerprint"]
    assert (third / "models" / "stage4" / "model.safetensors").is_file()
    assert sh(third, "git", "status", "--porcelain") == ""
