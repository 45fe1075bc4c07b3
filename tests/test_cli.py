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
