"""``clipid compare [EXP ...]``: the headline figures of experiments side by side.

``dvc exp show`` prints every param and metric (hundreds of columns); this is the table of
``metrics/report.md`` across experiments: one line per experiment and stage with image-to-image
R1 and mAP and text-to-image mAP, in percent (± the std over query/gallery draws where there are
several). It reads what DVC records for the workspace, the baseline commit and each of its
experiments from ``dvc exp show --json`` (its flat table, and ``dvc.api.exp_show``, drop the file
name of a metric that only one file has, which would mix stages up).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clipid.errors import ClipidError
from clipid.stage_registry import model_stages
from clipid.workspace import Workspace

__all__ = ["HEADLINES", "Metrics", "compare_table", "experiment_rows"]

HEADLINES = (("i2i", "R1"), ("i2i", "mAP"), ("t2i", "mAP"))


Metrics = dict[str, Any]   # metric file -> its content, as `dvc exp show --json` gives it


def experiment_rows(names: list[str] | tuple[str, ...] = (), repo: str | Path | None = None
                    ) -> list[tuple[str, Metrics]]:
    """(name, metrics) of what ``dvc exp show`` lists: the workspace, the baseline commit and
    its experiments; only those ``names`` gives (an experiment's name or a revision) if any. An
    unknown name is an error naming the known ones."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo,
                          capture_output=True, text=True)
    if proc.returncode:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise ClipidError(f"dvc exp show failed: {lines[-1]}")
    rows = list(_rows(json.loads(proc.stdout)))
    if not names:
        return [(name, metrics) for name, _, metrics in rows]
    known = {key: (name, metrics) for name, rev, metrics in rows for key in (name, rev)}
    missing = [name for name in names if name not in known]
    if missing:
        raise ClipidError(f"no experiment {', '.join(repr(m) for m in missing)}; known: "
                          f"{', '.join(name for name, _, _ in rows)} (dvc exp show)")
    return [known[name] for name in names]


def _rows(entries: list[dict]) -> Iterator[tuple[str, str, Metrics]]:
    """(name, revision, metrics) of each entry of ``dvc exp show --json`` and its experiments."""
    for entry in entries:
        yield _row(entry)
        for experiment in entry.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                yield _row(rev)


def _row(entry: dict) -> tuple[str, str, Metrics]:
    rev = str(entry["rev"])
    name = entry.get("name") or (rev if rev == "workspace" else rev[:7])
    metrics = (entry.get("data") or {}).get("metrics") or {}
    return name, rev, {path: (m or {}).get("data") or {} for path, m in metrics.items()}


def _cell(metrics: Metrics, stage: str, block: str, metric: str) -> str | None:
    content = metrics.get(Workspace().stage_metrics(stage).as_posix(), {})
    value = content.get(block, {}).get(metric)
    if not isinstance(value, (int, float)):
        return None
    std = content.get(block, {}).get(f"{metric}_std")
    several = isinstance(std, (int, float)) and content.get("draws", 1) > 1
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if several else "")


def compare_table(rows: list[tuple[str, Metrics]], stages: tuple[str, ...] | None = None
                  ) -> str:
    """The Markdown table: one line per experiment and evaluated stage."""
    header = " | ".join(f"{block} {metric}" for block, metric in HEADLINES)
    lines = [f"| experiment | stage | {header} |",
             "|---|---|" + "---:|" * len(HEADLINES)]
    for name, metrics in rows:
        for stage in stages or model_stages():
            cells = [_cell(metrics, stage, block, metric) for block, metric in HEADLINES]
            if any(cells):
                lines.append(f"| {name} | {stage} | "
                             f"{' | '.join(c or '–' for c in cells)} |")
    return "\n".join(lines)
