"""The DVC pipeline end to end, in a temporary git repository, on a micro configuration."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import VENV_BIN, MicroBuild

REPO = Path(__file__).resolve().parents[1]

MICRO = {"data": {"synthetic": {"items": 12, "views": 3, "image_size": 48}, "cache_size": 32,
                  "workers": 0},
         "train": {"epochs": 1, "batch_size": 6, "pk_k": 3, "log_every": 1},
         "clipreid": {"prompt_epochs": 1, "prompt_batch_size": 6}}
STAGES = ("stage1", "stage2", "stage3", "stage4", "clipreid")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def sh(cwd: Path, *cmd: str, timeout: int = 1800) -> str:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def wait_for_queue(repo: Path, timeout_s: float = 1800, recheck_s: float = 20) -> str:
    """``dvc queue status`` once no experiment is queued or running. Each look costs a DVC
    start (~1 s of CPU, on a machine the experiments keep busy): between looks, git's
    experiment refs (one more per experiment done) say cheaply when to look again; a failed
    experiment adds none, so DVC is asked at least every ``recheck_s``."""
    def refs() -> str:
        return sh(repo, "git", "for-each-ref", "refs/exps")

    deadline, pause = time.monotonic() + timeout_s, recheck_s
    while time.monotonic() < deadline:
        done, status = refs(), sh(repo, "dvc", "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        look_again, pause = min(deadline, time.monotonic() + pause), recheck_s
        while time.monotonic() < look_again:
            time.sleep(0.5)  # polling the queue's results, not timing anything
            if refs() != done:  # one finished (DVC may list it as running a moment longer)
                pause = 2
                break
    pytest.fail(f"the queue did not finish within {timeout_s} s:\n{status}")


def write_micro_pipeline(repo: Path) -> Path:
    """This project's code and pipeline in ``repo``, with the micro params.yaml."""
    repo.mkdir(parents=True)
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo)
    shutil.copy(REPO / ".gitignore", repo)
    shutil.copy(REPO / ".dvcignore", repo)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(_merge(params, MICRO)))
    return repo


def mlflow_runs(repo: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments])


def stage_runs(repo: Path) -> list:
    """The stage runs (tag clipid.stage), without the parent run of each pipeline execution."""
    return [r for r in mlflow_runs(repo) if "clipid.stage" in r.data.tags]


@pytest.mark.slow
def test_dvc_repro_runs_the_whole_dag(micro_built: MicroBuild, tmp_path: Path) -> None:
    """What the session's micro build (``dvc repro`` in a fresh clone) made. A second repro
    that runs nothing but the always-changed stages: test_mlflow_view; a changed parameter in
    an experiment: its queue test."""
    micro_repo = tmp_path / "repo"
    shutil.copytree(micro_built.first, micro_repo, symlinks=True)
    ran = set(re.findall(r"Running stage '([^']+)'", micro_built.out))
    assert {"prepare", "clean_captions", "train_stage4", "clipreid_image", "report"} <= ran
    data = json.loads((micro_repo / "metrics" / "data.json").read_text())
    n_test = round(12 * 0.5)
    assert data["train"] == {"images": (12 - n_test) * 3, "identities": 12 - n_test}
    assert data["query"] == {"images": n_test, "identities": n_test}
    assert data["gallery"] == {"images": n_test * 2, "identities": n_test}
    texts = json.loads((micro_repo / "data" / "prepared" / "image_texts.json").read_text())
    assert len(texts) == 36 and all(texts.values())
    captions = json.loads((micro_repo / "metrics" / "captions.json").read_text())
    assert captions["captions"] == 36
    for stage in STAGES:
        metrics = json.loads((micro_repo / "metrics" / f"{stage}.json").read_text())
        assert metrics["queries"] == n_test and 0 <= metrics["i2i"]["mAP"] <= 1
        assert "mAP" in metrics["t2i"]
        curve = json.loads((micro_repo / "metrics" / "cmc" / f"{stage}.json").read_text())
        assert curve[0]["rank"] == 1 and curve[-1]["cmc"] == pytest.approx(1.0)
    report = (micro_repo / "metrics" / "report.md").read_text()
    assert all(f"| {stage} |" in report for stage in STAGES)
    assert (micro_repo / "metrics" / "report" / "cmc.png").stat().st_size > 0
    assert (micro_repo / "metrics" / "report" / "examples.png").stat().st_size > 0
    shown = sh(micro_repo, "dvc", "metrics", "show")
    assert "stage4.json" in shown

    # One MLflow run per training stage (with its evaluation), one for Stage 1, one report.
    # ... nested under one parent run of this execution (issue 24).
    [parent] = [r for r in mlflow_runs(micro_repo) if "clipid.stage" not in r.data.tags]
    runs = {r.data.tags["clipid.stage"]: r for r in stage_runs(micro_repo)}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    assert set(runs) == {"evaluate_stage1", "train_stage2", "train_stage3", "train_stage4",
                         "clipreid_prompts", "clipreid_image", "index", "report"}
    assert "eval/i2i/mAP" in runs["clipreid_image"].data.metrics
    assert "train/i2t" in runs["clipreid_image"].data.metrics
    assert "train/t2i" in runs["clipreid_prompts"].data.metrics
    # The gallery index serves `clipid search` with the Stage 3 and Stage 4 models.
    index = json.loads((micro_repo / "metrics" / "index.json").read_text())
    assert {m: e["images"] for m, e in index.items()} == {"stage4": n_test * 2,
                                                          "stage3": n_test * 2}
    found = json.loads(sh(micro_repo, "clipid", "search", "--text", "a red shirt", "--json"))
    assert found["model"] == "stage3" and len(found["results"]) == 10
    assert (micro_repo / "search.png").stat().st_size > 0
    # Every training run and Stage 1 registered a model; champion is the best stage's version.
    from mlflow.tracking import MlflowClient

    registry = MlflowClient(f"sqlite:///{micro_repo / 'mlflow.db'}")
    champions = json.loads((micro_repo / "metrics" / "register.json").read_text())
    for name, block in (("clipid-image", "i2i"), ("clipid-text", "t2i")):
        assert len(registry.search_model_versions(f"name = '{name}'")) == len(STAGES)
        best = max(STAGES, key=lambda s: json.loads(
            (micro_repo / "metrics" / f"{s}.json").read_text())[block]["mAP"])
        assert champions[name]["stage"] == best
        champion = registry.get_model_version_by_alias(name, "champion")
        assert champion.tags["clipid.stage"] == best
    for stage in ("stage3", "stage4"):
        assert {p.name for p in (micro_repo / "models" / "export" / stage).iterdir()} == {
            "image.onnx", "text.onnx", "model.json"}
    stage2 = runs["train_stage2"]
    assert stage2.data.params["train.lr"] == "0.001"
    assert "eval/i2i/mAP" in stage2.data.metrics and "train/loss" in stage2.data.metrics

    # Captions feed every stage after them, not the data preparation: an experiment that
    # changes them runs clean_captions alone, and leaves every training stage to rerun.
    sh(micro_repo, "git", "add", "-A")
    sh(micro_repo, "git", "commit", "-qm", "baseline run")
    out = sh(micro_repo, "dvc", "exp", "run", "-S", "captions.casing=sentence", "clean_captions")
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert "clean_captions" in ran and "prepare" not in ran
    texts = json.loads((micro_repo / "data" / "prepared" / "image_texts.json").read_text())
    assert any(t[0].isupper() for t in texts.values())
    changed = {line.rstrip(":") for line in sh(micro_repo, "dvc", "status").splitlines()
               if line and not line[0].isspace()}
    assert {"train_stage2", "train_stage3", "train_stage4", "evaluate_stage1"} <= changed
    assert "prepare" not in changed and "clean_captions" not in changed


# `clipid <args>` with torch and open_clip unimportable (None in sys.modules).
WITHOUT_TORCH = ("import sys; sys.modules.update(torch=None, open_clip=None); "
                 "from clipid.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.slow
def test_track_and_register_start_without_torch(micro_built: MicroBuild, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """track (every `dvc repro` runs it) and register read metrics, hashes and the store:
    importing torch and open_clip would cost each seconds of start-up."""
    repo = tmp_path / "repo"
    shutil.copytree(micro_built.first, repo, symlinks=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the copy's own store
    champions = json.loads((repo / "metrics" / "register.json").read_text())
    # (A Stage 1 champion's digest needs its model rebuilt: torch, rightly.)
    assert "stage1" not in {block["stage"] for block in champions.values()}, champions
    python = str(VENV_BIN / "python")
    registered = sh(repo, python, "-c", WITHOUT_TORCH, "register", *STAGES)
    assert all(f"{name}@champion version" in registered for name in champions), registered
    tracked = sh(repo, python, "-c", WITHOUT_TORCH, "track")
    assert "0 change(s)" in tracked, tracked
