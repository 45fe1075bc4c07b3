"""`clipid compare`: experiments x stages with the headline figures, from a real DVC repo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipid.compare import compare_table, experiment_rows
from clipid.errors import ClipidError

REPO = Path(__file__).resolve().parents[1]
# Writes the metric files of two stages from param x; stage2 over three draws.
WRITE = """
import json, pathlib, yaml
x = yaml.safe_load(open("params.yaml"))["x"]
pathlib.Path("metrics").mkdir(exist_ok=True)
one = {"i2i": {"R1": x / 10, "mAP": x / 20}, "t2i": {"mAP": x / 40}, "draws": 1}
many = {"i2i": {"R1": x / 5, "R1_std": 0.01, "mAP": x / 8, "mAP_std": 0.02},
        "t2i": {"mAP": x / 16, "mAP_std": 0.0}, "draws": 3}
pathlib.Path("metrics/stage1.json").write_text(json.dumps(one))
pathlib.Path("metrics/stage2.json").write_text(json.dumps(many))
"""


def sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    (root / "write.py").write_text(WRITE)
    (root / "params.yaml").write_text("x: 1\n")
    (root / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: python write.py\n    deps: [write.py]\n    params: [x]\n"
        "    metrics:\n      - metrics/stage1.json:\n          cache: false\n"
        "      - metrics/stage2.json:\n          cache: false\n")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "t"], ["dvc", "init", "-q"],
                ["dvc", "repro", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "base"],
                ["dvc", "exp", "run", "-q", "-n", "bright", "-S", "x=2"]):
        sh(root, *cmd)
    return root


@pytest.mark.slow
def test_one_line_per_experiment_and_stage(repo: Path) -> None:
    table = compare_table(experiment_rows(repo=repo), stages=("stage1", "stage2"))
    lines = table.splitlines()
    assert lines[0] == "| experiment | stage | i2i R1 | i2i mAP | t2i mAP |"
    assert "| bright | stage1 | 20.0 | 10.0 | 5.0 |" in lines  # x = 2, single draw: no ±
    assert "| bright | stage2 | 40.0 ± 1.0 | 25.0 ± 2.0 | 12.5 ± 0.0 |" in lines
    assert sum(line.startswith("| bright |") for line in lines) == 2


@pytest.mark.slow
def test_named_experiments_only_and_unknown_names_say_the_known(repo: Path) -> None:
    rows = experiment_rows(["bright"], repo=repo)
    assert [name for name, _ in rows] == ["bright"]
    with pytest.raises(ClipidError, match="no experiment 'dim'; known: .*bright"):
        experiment_rows(["dim"], repo=repo)


def test_dvc_plots_output_is_git_ignored() -> None:
    check = subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=REPO)
    assert check.returncode == 0
