"""The command line as a user first meets it: --version, --help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clipid import __version__, cli


def test_version_is_the_package_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    version = re.search(r'^version = "(.+)"$', pyproject, re.M).group(1)  # no tomllib on 3.10
    assert capsys.readouterr().out.strip() == f"clipid {version}"
    assert __version__ == version


@pytest.mark.parametrize("command", [[], *([name] for name in cli.COMMANDS)])
def test_help_is_plain_text(command: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: clipid") and "`" not in text  # no reStructuredText markup


def test_tracking_actions_are_described(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["tracking", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "status: list the runs spooled" in text and "sync: replay them" in text


def test_stage_output_leaves_out_library_chatter(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = f"""
import logging
from clipid.cli import configure_logging
configure_logging()
import clipid.models, open_clip
from clipid.tracking import mlflow_client
logging.getLogger("clipid.stages.x").info("a line for the user")
open_clip.create_model("clipid-vit-tiny")
mlflow_client("sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
logging.getLogger("mlflow.store.model_registry.abstract_store").info("Waiting up to 300 seconds")
logging.getLogger("clipid.stages.x").warning("a warning")
"""
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stderr
    assert "a line for the user" in err and "a warning" in err
    for chatter in ("Parsing model identifier", "Creating initial MLflow database tables",
                    "Waiting up to 300 seconds", "Updating database tables"):
        assert chatter not in err
