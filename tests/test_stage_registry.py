"""The stage registry is the one list of stages, and the Workspace the one place for paths: a
stage registered there is a CLI choice, a valid ``init`` and ``search.model`` and a report line,
with nothing else changed; every path a stage writes is one that dvc.yaml names."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from clipid import cli
from clipid.config import Params, StageParams, load_params
from clipid.stage_registry import (
    PRETRAINED,
    StageInfo,
    model_stages,
    register_stage,
    trained_stages,
    unregister_stage,
)
from clipid.stages.report import describe_stage, report_table
from clipid.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
TOY = "stage5"


def toy_spec(params: Params) -> StageParams:
    """A fifth stage: both towers from Stage 2, InfoNCE, PK sampler."""
    return StageParams(init="stage2", train_text=True, loss="infonce", sampler="pk", epochs=1)


@pytest.fixture
def toy_stage() -> Iterator[str]:
    register_stage(StageInfo(TOY, "train", "a toy fifth stage", "train_stage5", spec=toy_spec))
    try:
        yield TOY
    finally:
        unregister_stage(TOY)


def choices(command: str, argument: str = "stage") -> tuple[str, ...]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    action = next(a for a in sub.choices[command]._actions if a.dest == argument)
    return tuple(action.choices)


def check(tmp_path: Path, text: str, capsys) -> tuple[int, str]:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    code = cli.main(["check-params", "--params", str(path)])
    return code, capsys.readouterr().err


TOY_PARAMS = "search:\n  model:\n    image: stage5\nstage4:\n  init: stage5\n"


@pytest.mark.parametrize("text, line, key", [
    (TOY_PARAMS, 5, "'stage4.init' is 'stage5'"),
    ("search:\n  model:\n    image: stage5\n", 3, "'search.model.image' is 'stage5'"),
])
def test_a_stage_is_refused_before_it_is_registered(tmp_path, capsys, text, line, key):
    code, err = check(tmp_path, text, capsys)
    assert code == 2 and f"{tmp_path / 'params.yaml'}:{line}: {key}" in err
    assert TOY not in choices("train") and TOY not in choices("evaluate")


def test_a_registered_stage_is_everywhere_a_stage_is_named(toy_stage, tmp_path, capsys):
    assert toy_stage in trained_stages() and toy_stage in model_stages()
    for command, argument in (("train", "stage"), ("evaluate", "stage"), ("export", "stage"),
                              ("search", "model"), ("report", "stages"),
                              ("register", "stages")):
        assert toy_stage in choices(command, argument), command
    # A valid search model and init: stage4 now starts from it, and it from stage2.
    assert check(tmp_path, TOY_PARAMS, capsys) == (0, "")
    params = load_params(tmp_path / "params.yaml")
    assert describe_stage(params, toy_stage) == \
        "image + text towers; infonce; pk sampler; from stage2"
    assert describe_stage(params, "stage4").endswith("from stage5")
    table = report_table(params, [toy_stage], {toy_stage: {"i2i": {"R1": 0.5}}})
    assert f"| {toy_stage} | image + text towers; infonce" in table


def test_the_pk_sampler_of_a_registered_stage_is_checked(toy_stage, tmp_path, capsys):
    code, err = check(tmp_path, "train:\n  batch_size: 30\n", capsys)
    assert code == 2 and f"stage4, clipreid, {toy_stage}" in err


def test_cycles_through_a_registered_stage_are_found(toy_stage, tmp_path, capsys):
    code, err = check(tmp_path, "stage2:\n  init: stage5\n", capsys)
    assert code == 2 and "stage2.init is stage5, stage5.init is stage2" in err


def test_zeroshot_is_no_command_and_evaluate_takes_stage1():
    assert "zeroshot" not in cli.COMMANDS
    assert PRETRAINED in choices("evaluate")
    assert PRETRAINED not in choices("train")
    assert "clipreid_prompts" not in choices("evaluate")  # prompts are no model


def test_the_report_lines_of_the_default_stages():
    params = load_params(REPO / "params.yaml")
    assert describe_stage(params, "stage1") == "random weights (seed 0), no training"
    assert describe_stage(params, "stage2") == \
        "image tower; supcon; random sampler; from stage1"
    assert describe_stage(params, "stage4") == \
        "image tower; CE + triplet + center; pk sampler; from stage3"
    assert describe_stage(params, "clipreid") == (
        "CLIP-ReID: prompts (4 learnt tokens per identity), then image tower; "
        "i2t CE + CE + triplet; pk sampler; from stage1")


def _dvc_paths() -> set[str]:
    """Every path dvc.yaml names as a dep or an output, with ${item} expanded."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    paths: set[str] = set()
    for stage in stages.values():
        bodies = [stage] if "do" not in stage else [
            yaml.safe_load(yaml.safe_dump(stage["do"]).replace("${item}", item))
            for item in stage["foreach"]]
        for body in bodies:
            for key in ("deps", "outs", "metrics", "plots"):
                for entry in body.get(key, []):
                    paths.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths


def test_the_workspace_paths_are_the_ones_dvc_yaml_names():
    ws = Workspace()
    named = _dvc_paths()
    fixed = [ws.fingerprint, ws.images, ws.manifest, ws.rejected, ws.image_texts,
             ws.data_metrics, ws.caption_metrics, ws.index_metrics, ws.register_metrics,
             ws.report, ws.report_figures / "cmc.png", ws.index_dir("x").parent,
             ws.export_dir("x").parent]
    per_stage = [f(stage) for stage in model_stages()
                 for f in (ws.stage_metrics, ws.stage_cmc, ws.stage_examples)]
    per_stage += [ws.stage_dir(stage) for stage in trained_stages()]
    per_stage += [ws.stage_dir("clipreid_prompts")]
    missing = [str(p) for p in fixed + per_stage if str(p) not in named]
    assert missing == []
    # Relative to the working directory: the strings DVC outputs hold (a checkpoint's path in
    # metrics/<stage>.json) do not depend on where the clone is.
    assert str(ws.weights("stage2")) == "models/stage2/model.safetensors"
    assert str(ws.weights("clipreid_prompts")) == "models/clipreid_prompts/prompts.safetensors"


def test_search_and_serve_import_nothing_from_the_stages():
    src = REPO / "src" / "clipid"
    for folder in ("search", "serve", "models", "deploy"):
        for path in (src / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module:
                    assert not node.module.startswith("clipid.stages"), f"{path}: {node.module}"
