"""MLflow is the complete view of what DVC built, whatever DVC ran, skipped or restored.

Each test reads a store that started empty, after the micro pipeline of test_pipeline.py ran in
a fresh clone (the session's micro build), in a clone sharing its DVC cache (every stage restored
from the run-cache), with the store down (then the spool replayed), and in two queued
experiments run with ``dvc queue start -j 2``. The expected content is read from the clone's
own DVC outputs and dvc.yaml, independently of clipid's reconciliation code.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from test_pipeline import sh, wait_for_queue

from conftest import VENV_BIN, MicroBuild, MicroRebuild, micro_clone

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# registry name -> (DVC stage that makes its run, weights file under models/<name>/ or None)
MODEL_STAGES = {"stage1": ("evaluate_stage1", None),
                "stage2": ("train_stage2", "model.safetensors"),
                "stage3": ("train_stage3", "model.safetensors"),
                "stage4": ("train_stage4", "model.safetensors"),
                "clipreid": ("clipreid_image", "model.safetensors")}
OTHER_RUNS = {"clipreid_prompts": "prompts.safetensors", "index": None, "report": None}
REPORT_FILES = ("report.md", "cmc.png", "examples.png")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def client(repo: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def all_runs(repo: Path) -> list[Any]:
    mlflow = client(repo)
    return mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])


def flat_params(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_params(repo: Path, dvc_stage: str) -> set[str]:
    """The params.yaml keys the stage lists in dvc.yaml (the whole section for a section)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    stage = stages[dvc_stage.split("@")[0]]
    listed = stage.get("do", stage)["params"]
    keys = flat_params(yaml.safe_load((repo / "params.yaml").read_text()))
    return {k for k in keys if any(k == p or k.startswith(p + ".") for p in listed)}


def parents(repo: Path) -> dict[str, Any]:
    """pipeline key -> its parent run."""
    found: dict[str, Any] = {}
    for run in all_runs(repo):
        if run.data.tags.get("clipid.role") == "pipeline":
            key = run.data.tags["clipid.pipeline"]
            assert key not in found, f"two parent runs for {key}"
            found[key] = run
    return found


def assert_complete(repo: Path, store: Path, key: str, label: str,
                    committed: dict[str, str] | None = None) -> dict[str, Any]:
    """The store at ``store`` holds, for the execution ``key``, the complete view of the DVC
    outputs of ``repo`` (``committed``: file -> text, an experiment's outputs in git; its
    champion alias is checked by the caller). Returns ``{stage: run}`` of its runs."""
    def text(name: str) -> str:
        return committed[name] if committed is not None else (repo / name).read_text()

    parent = parents(store)[key]
    assert parent.info.run_name == label
    children = [r for r in all_runs(store) if r.data.tags.get("mlflow.parentRunId")
                == parent.info.run_id]
    by_stage = {r.data.tags["clipid.stage"]: r for r in children}
    expected = {dvc for dvc, _ in MODEL_STAGES.values()} | set(OTHER_RUNS)
    assert sorted(r.data.tags["clipid.stage"] for r in children) == sorted(expected)
    for name, (dvc_stage, weights) in MODEL_STAGES.items():
        run = by_stage[dvc_stage]
        assert run.info.run_name == f"{label}/{name}"
        figures = json.loads(text(f"metrics/{name}.json"))
        for block, key in (("i2i", "mAP"), ("t2i", "R1")):  # the files round to 6 places
            assert run.data.metrics[f"eval/{block}/{key}"] == pytest.approx(
                figures[block][key], abs=1e-6)
        wanted = read_params(repo, dvc_stage)
        if weights:
            wanted |= read_params(repo, f"evaluate@{name}")
            if committed is None:
                assert run.data.tags["clipid.checkpoint.sha256"] == sha256(
                    repo / "models" / name / weights)
        assert set(run.data.params) == wanted, dvc_stage
    assert not any(k.startswith("serve.") for r in children for k in r.data.params)
    report = {Path(a.path).name for a in client(store).list_artifacts(
        by_stage["report"].info.run_id, "report")}
    assert report == set(REPORT_FILES)
    assert_registry(store, children, json.loads(text("metrics/register.json")),
                    alias=committed is None)
    return by_stage


def assert_registry(store: Path, children: list[Any], champions: dict[str, dict],
                    alias: bool) -> None:
    """One version per distinct weights of the model runs; champion on register.json's stage."""
    mlflow = client(store)
    digests = {r.data.tags["clipid.weights_sha256"] for r in children
               if r.data.tags["clipid.stage"] in {d for d, _ in MODEL_STAGES.values()}}
    assert len(digests) == len(MODEL_STAGES)
    for model, block in champions.items():
        versions = mlflow.search_model_versions(f"name = '{model}'")
        held = [v.tags["clipid.weights_sha256"] for v in versions]
        assert digests <= set(held) and len(held) == len(set(held)), model
        if alias:
            champion = mlflow.get_model_version_by_alias(model, "champion")
            assert champion.tags["clipid.weights_sha256"] == champion_digest(
                children, block["stage"])


def champion_digest(children: list[Any], stage: str) -> str:
    run = next(r for r in children if r.data.tags["clipid.stage"] == MODEL_STAGES[stage][0])
    return run.data.tags["clipid.weights_sha256"]


def head(repo: Path) -> str:
    return sh(repo, "git", "rev-parse", "HEAD").strip()


def store_state(store: Path) -> dict[str, Any]:
    """What the UI shows, without ids and times: runs by name with their tags, params and
    metrics; versions by weights; aliases by weights."""
    mlflow = client(store)
    volatile = ("mlflow.", "clipid.host", "clipid.pid", "clipid.spool.", "clipid.restored",
                "dvc.stage", "clipid.eval_stage")
    runs = {r.info.run_name: ({k: v for k, v in r.data.tags.items()
                               if not k.startswith(volatile)},
                              r.data.params, {k: round(v, 6) for k, v in r.data.metrics.items()
                                              if k.startswith("eval/")})
            for r in all_runs(store)}
    registry = {}
    for model in ("clipid-image", "clipid-text"):
        versions = mlflow.search_model_versions(f"name = '{model}'")
        alias = mlflow.get_model_version_by_alias(model, "champion")
        registry[model] = (sorted(v.tags["clipid.weights_sha256"] for v in versions),
                           alias.tags["clipid.weights_sha256"])
    return {"runs": runs, "registry": registry}


def outputs(repo: Path) -> dict[str, str]:
    """SHA-256 of dvc.lock and of every file under metrics/ and models/."""
    files = [repo / "dvc.lock", *(repo / "metrics").rglob("*"), *(repo / "models").rglob("*")]
    return {str(f.relative_to(repo)): sha256(f) for f in files if f.is_file()}


@pytest.fixture
def copy_of_first(micro_built: MicroBuild, tmp_path: Path) -> Path:
    repo = tmp_path / "first"
    shutil.copytree(micro_built.first, repo, symlinks=True)
    return repo


def test_a_fresh_clone_holds_every_stage_and_a_second_repro_adds_nothing(
        micro_built: MicroBuild, copy_of_first: Path, tmp_path: Path) -> None:
    first = copy_of_first
    commit = head(first)
    assert_complete(first, first, f"repro:{commit}", commit[:7])
    # The README's snippet loads the champion on this clone.
    snippet = re.search(r"```python\n(import base64, mlflow.pyfunc.*?)```",
                        (REPO / "README.md").read_text(), re.S).group(1)
    photo = next((first / "data" / "prepared" / "images").rglob("*.png"))
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace('"photo.jpg"', repr(str(photo)))
                      + "print(vectors.shape, queries.shape)\n")
    out = subprocess.run([str(VENV_BIN / "python"), str(script)], cwd=first, text=True,
                         capture_output=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert re.search(r"\(1, \d+\) \(1, \d+\)", out.stdout), out.stdout

    before, written = store_state(first), outputs(first)
    run_ids = sorted(r.info.run_id for r in all_runs(first))
    again = sh(first, "dvc", "repro")
    assert re.findall(r"Running stage '([^']+)'", again) == ["fingerprint", "track"]
    assert sh(first, "dvc", "status").split() == ["fingerprint:", "always", "changed",
                                                  "track:", "always", "changed"]
    assert "0 change(s)" in again
    assert sorted(r.info.run_id for r in all_runs(first)) == run_ids
    assert store_state(first) == before
    assert outputs(first) == written  # the store's ids stay out of DVC's outputs


def test_a_clone_restored_from_the_run_cache_holds_every_stage(micro_built: MicroBuild,
                                                               tmp_path: Path) -> None:
    clone = micro_clone(micro_built.origin, tmp_path / "clone", micro_built.cache)
    out = sh(clone, "dvc", "repro")
    # DVC restores every stage its run-cache holds: all but the report (its report.md is an
    # uncached output that is not a metric or plot) and the always-changed ones.
    ran = re.findall(r"Running stage '([^']+)'", out)
    assert ran == ["fingerprint", "report", "track"], ran
    for stage in ("prepare", "evaluate_stage1", "train_stage2", "evaluate@stage2", "train_stage3",
                  "train_stage4", "clipreid_prompts", "clipreid_image", "evaluate@clipreid",
                  "index", "register", "export"):
        assert f"Stage '{stage}' is cached - skipping run" in out, stage
    commit = head(clone)
    runs = assert_complete(clone, clone, f"repro:{commit}", commit[:7])
    assert runs["clipreid_prompts"].data.tags["clipid.restored"] == "dvc"
    assert runs["index"].data.tags["clipid.restored"] == "dvc"


def test_with_the_store_down_the_spool_replays_to_the_same_state(
        micro_built: MicroBuild, micro_rebuilt: MicroRebuild) -> None:
    """The micro pipeline trained again in another clone with the store out of reach (every
    stage's run spooled), then ``clipid tracking sync``: the store the first clone's live runs
    made, run for run (its bytes: test_reproducible)."""
    down = micro_rebuilt.clone
    assert "not reconciled: spooled to" in micro_rebuilt.out
    assert not micro_rebuilt.store_while_down and micro_rebuilt.spooled
    assert not list((down / ".clipid" / "spool").rglob("*.json"))
    commit = head(down)
    assert_complete(down, down, f"repro:{commit}", commit[:7])
    assert store_state(down) == store_state(micro_built.first)


def test_two_queued_experiments_in_parallel_each_hold_every_stage(
        copy_of_first: Path) -> None:
    repo = copy_of_first
    for path in (repo / "mlflow.db", repo / "mlruns"):  # a store that starts empty
        if path.is_dir():
            shutil.rmtree(path)
        path.unlink(missing_ok=True)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "repro")
    baseline = head(repo)
    # Two experiments on a parameter only Stage 4 reads: one keeps its value, one doubles it.
    triplet = {"same-triplet": "1.0", "double-triplet": "2.0"}
    for name, weight in triplet.items():
        sh(repo, "dvc", "exp", "run", "--queue", "-n", name, "-S",
           f"stage4.triplet_weight={weight}")
    sh(repo, "dvc", "queue", "start", "-j", "2")
    status = wait_for_queue(repo)
    assert status.count("Success") == 2, status
    # A changed parameter reruns exactly the stages that read it (each experiment's own log).
    ran = {name: set(re.findall(r"Running stage '([^']+)'", sh(repo, "dvc", "queue", "logs",
                                                                 name))) for name in triplet}
    training = {dvc for dvc, file in MODEL_STAGES.values() if file} | {"clipreid_prompts"}
    assert ran["double-triplet"] & training == {"train_stage4"}, ran["double-triplet"]
    assert {"evaluate@stage4", "index", "report", "register", "export"} <= ran["double-triplet"]
    assert not ran["same-triplet"] & training, ran["same-triplet"]  # 1.0 is the baseline's
    ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/double-triplet"
    diff = sh(repo, "dvc", "metrics", "diff", baseline, ref)
    assert "metrics/stage4.json" in diff and "metrics/stage3.json" not in diff
    champions = set()
    for name, weight in triplet.items():
        ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
        committed = {f: sh(repo, "git", "show", f"{ref}:{f}") for f in
                     [f"metrics/{s}.json" for s in MODEL_STAGES] + ["metrics/register.json"]}
        runs = assert_complete(repo, repo, f"exp:{name}:{baseline}", name, committed)
        assert runs["train_stage4"].data.params["stage4.triplet_weight"] == weight
        best = json.loads(committed["metrics/register.json"])["clipid-image"]["stage"]
        champions.add(champion_digest(list(runs.values()), best))
    # champion: the image champion of the experiment whose track stage ran last
    alias = client(repo).get_model_version_by_alias("clipid-image", "champion")
    assert alias.tags["clipid.weights_sha256"] in champions
    # same-triplet's weights are the baseline's: DVC restored them, no version was added twice.
    digests = {r.data.tags.get("clipid.weights_sha256") for r in all_runs(repo)} - {None}
    versions = client(repo).search_model_versions("name = 'clipid-image'")
    assert sorted(v.tags["clipid.weights_sha256"] for v in versions) == sorted(digests)
