"""`dvc repro` notices a real data set's changes under data.root: the fingerprint and prepare
stages of this project's dvc.yaml, in a temporary git repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_pipeline import REPO, sh

from conftest import draw

pytestmark = pytest.mark.slow


def make_repo(tmp_path: Path, data: dict) -> Path:
    """A git + DVC repo with the real fingerprint and prepare stages and ``data`` params."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    pipeline = {"stages": {name: stages[name] for name in ("fingerprint", "prepare")}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    shutil.copy(REPO / ".gitignore", repo)
    params = {"data": {"workers": 0, "cache_size": 16, "splits": 2, **data}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "test@example.com"],
                ["git", "config", "user.name", "clipid test"], ["dvc", "init", "-q"],
                ["dvc", "config", "core.analytics", "false"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "fingerprint and prepare"]):
        sh(repo, *cmd)
    return repo


def repro(repo: Path) -> list[str]:
    """The stages one ``dvc repro`` ran."""
    return re.findall(r"Running stage '([^']+)'", sh(repo, "dvc", "repro"))


def assert_nothing_reruns(repo: Path, status: bool = False) -> None:
    assert repro(repo) == ["fingerprint"]  # always runs; its output is byte-identical
    if status:
        assert sh(repo, "dvc", "status").split() == ["fingerprint:", "always", "changed"]


def prepared_captions(repo: Path) -> set[str]:
    table = pd.read_csv(repo / "data" / "prepared" / "manifest.csv", dtype=str,
                        keep_default_na=False)
    return set(table["caption"])


def edit_keeping_mtime(path: Path, old: str, new: str) -> None:
    """Same size and modification time after the edit: only the content tells."""
    before = path.stat()
    text = path.read_text()
    assert old in text and len(old) == len(new)
    path.write_text(text.replace(old, new))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_manifest_changes_rerun_prepare_and_nothing_else_does(tmp_path, manifest_root):
    repo = make_repo(tmp_path, {"source": "manifest", "root": str(manifest_root),
                                "max_rejected_fraction": 0.5})
    assert repro(repo) == ["fingerprint", "prepare"]
    assert_nothing_reruns(repo, status=True)

    draw(manifest_root / "pics" / "new.png", 50)  # an image added
    assert repro(repo) == ["fingerprint", "prepare"]

    edit_keeping_mtime(manifest_root / "manifest.csv", "</b> 7 &amp; more", "</b> 7 &amp; mORE")
    assert repro(repo) == ["fingerprint", "prepare"]
    captions = prepared_captions(repo)
    assert any("7 &amp; mORE" in c for c in captions)
    assert not any("7 &amp; more" in c for c in captions)

    (manifest_root / "pics" / "0.png").unlink()  # an image removed: prepare rejects it
    assert repro(repo) == ["fingerprint", "prepare"]
    rejected = pd.read_csv(repo / "data" / "prepared" / "rejected.csv", dtype=str)
    assert list(rejected["source_image"]) == ["pics/0.png"]
    assert_nothing_reruns(repo)

    # Another copy: the same fingerprint, but data.root is a `data` param of prepare.
    copy = shutil.copytree(manifest_root, tmp_path / "copy", copy_function=shutil.copy2)
    fingerprint = (repo / "data" / "fingerprint.json").read_bytes()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["root"] = str(copy)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert repro(repo) == ["fingerprint", "prepare"]
    assert (repo / "data" / "fingerprint.json").read_bytes() == fingerprint


def test_hands11k_changes_rerun_prepare_and_nothing_else_does(tmp_path, hands_root):
    repo = make_repo(tmp_path, {"source": "hands11k", "root": str(hands_root)})
    assert repro(repo) == ["fingerprint", "prepare"]
    assert any("27 year old man" in c for c in prepared_captions(repo))

    edit_keeping_mtime(hands_root / "HandInfo.csv", "0000000,27,", "0000000,28,")
    assert repro(repo) == ["fingerprint", "prepare"]
    captions = prepared_captions(repo)
    assert any("28 year old man" in c for c in captions)
    assert not any("27 year old man" in c for c in captions)
    assert_nothing_reruns(repo, status=True)

    draw(hands_root / "Hands" / "Hand_0009999.jpg", 77)  # an image added
    assert repro(repo) == ["fingerprint", "prepare"]
    assert_nothing_reruns(repo)


def test_a_failed_exp_run_leaves_the_committed_fingerprint(tmp_path, manifest_root):
    repo = make_repo(tmp_path, {"source": "manifest", "root": str(manifest_root)})
    repro(repo)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "fingerprint and prepared data")
    committed = (repo / "data" / "fingerprint.json").read_bytes()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    failed = subprocess.run(["dvc", "exp", "run", "-S", "data.root=/nonexistent/manifest.csv"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0 and "/nonexistent" in failed.stdout + failed.stderr
    assert (repo / "data" / "fingerprint.json").read_bytes() == committed
