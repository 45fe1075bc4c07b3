"""Writes one benchmark's section of BENCHMARKS.md, leaving the other sections as they are."""

from __future__ import annotations

import os
import platform
import re
from datetime import date
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nWritten by the scripts under `bench/` (`make bench`); each script "
          "replaces its own section. Targets come from the issues; a script exits non-zero when "
          "one is missed.\n")


def machine() -> str:
    import numpy
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}, numpy {numpy.__version__}, "
            f"torch {torch.__version__}; {date.today().isoformat()}")


def _section(name: str) -> re.Pattern:
    return re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)


def write_section(name: str, body: str, after: str | None = None) -> None:
    """Replace section ``name``; a new one goes after section ``after`` if given, else last."""
    text = BENCHMARKS.read_text(encoding="utf-8") if BENCHMARKS.is_file() else HEADER
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = _section(name)
    previous = _section(after).search(text) if after else None
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    elif previous:
        text = text[:previous.end()].rstrip() + "\n\n" + section + "\n" + text[previous.end():]
        text = text.rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    BENCHMARKS.write_text(text, encoding="utf-8")
