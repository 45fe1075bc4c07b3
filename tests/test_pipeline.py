"""The DVC pipeline end to end, in a temporary git repository, on a micro configuration."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import VENV_BIN

REPO = Path(__file__).resolve().parents[1]

MICRO = {"data": {"synthetic": {"items": 12, "views": 3, "image_size": 48}, "cache_size": 32,
                  "workers": 0}}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture
def micro_repo(tmp_path: Path) -> Path:
    """A git + DVC repo holding this project's pipeline and a micro params.yaml."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(_merge(params, MICRO)))
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "test@example.com")
    sh(repo, "git", "config", "user.name", "clipid test")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "config", "core.analytics", "false")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "micro pipeline")
    return repo


@pytest.mark.slow
def test_dvc_repro_runs_data_stages_then_does_nothing(micro_repo: Path):
    sh(micro_repo, "dvc", "repro")
    data = json.loads((micro_repo / "metrics" / "data.json").read_text())
    n_test = round(12 * 0.5)
    assert data["train"] == {"images": (12 - n_test) * 3, "identities": 12 - n_test}
    assert data["query"] == {"images": n_test, "identities": n_test}
    assert data["gallery"] == {"images": n_test * 2, "identities": n_test}
    texts = json.loads((micro_repo / "data" / "prepared" / "image_texts.json").read_text())
    assert len(texts) == 36 and all(texts.values())
    captions = json.loads((micro_repo / "metrics" / "captions.json").read_text())
    assert captions["captions"] == 36
    assert (micro_repo / "dvc.lock").is_file()

    second = sh(micro_repo, "dvc", "repro")
    assert "Running stage" not in second
    assert "up to date" in sh(micro_repo, "dvc", "status")

    # A changed parameter reruns exactly the stages that read it.
    out = sh(micro_repo, "dvc", "exp", "run", "-S", "captions.casing=sentence")
    assert "Running stage 'prepare'" not in out
    assert "Running stage 'clean_captions'" in out
    texts = json.loads((micro_repo / "data" / "prepared" / "image_texts.json").read_text())
    assert any(t[0].isupper() for t in texts.values())
