"""bench/workers: does `train.workers: auto` slow the default pipeline down on a small machine?

Trains Stage 2 and Stage 4 of the default synthetic data set and model on CPU with
`train.workers` 0 (decoding in the training process) and `auto` (cores minus one), interleaved,
best of `--reps` runs each, wall-clock of the whole `Trainer.fit` (worker start-up included).
Target (issue 18): auto / 0 time <= 1.05 on this machine. The weights are the same either way
(tests/test_loader.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from clipid.config import params_from_dict
from clipid.data.loader import resolve_workers
from clipid.stages.clean_captions import clean_captions
from clipid.stages.prepare import prepare
from clipid.training.engine import Trainer
from clipid.workspace import Workspace

from _report import machine, write_section


def fit_seconds(workers, stage: str, epochs: int, prepared: Path, work: Path, tag: str) -> float:
    raw = {"train": {"epochs": epochs, "workers": workers}, "stage4": {"init": "stage1"}}
    workspace = Workspace(work / tag)
    workspace.prepared.parent.mkdir(parents=True)
    workspace.prepared.symlink_to(prepared.resolve(), target_is_directory=True)
    trainer = Trainer(params_from_dict(raw), stage, device=torch.device("cpu"),
                      workspace=workspace)
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    cfg = parser.parse_args()
    best: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = params_from_dict({})
        workspace = Workspace(work)
        prepare(params, workspace)
        clean_captions(params, workspace)
        prepared = workspace.prepared
        for rep in range(cfg.reps):
            for stage in ("stage2", "stage4"):
                for workers in (0, "auto"):
                    seconds = fit_seconds(workers, stage, cfg.epochs, prepared, work,
                                          f"{stage}-{workers}-{rep}")
                    key = (stage, str(workers))
                    best[key] = min(best.get(key, float("inf")), seconds)
                    print(stage, workers, f"{seconds:.1f} s", flush=True)
    rows, checks = [], {}
    for stage in ("stage2", "stage4"):
        ratio = best[(stage, "auto")] / best[(stage, "0")]
        rows.append(f"| {stage} | {best[(stage, '0')]:.1f} | {best[(stage, 'auto')]:.1f} | "
                    f"{ratio:.2f} |")
        checks[f"{stage}: auto / 0 time <= 1.05"] = ratio <= 1.05
    body = "\n".join([
        f"Default synthetic data set and model, CPU, {cfg.epochs} epochs per run, best of "
        f"{cfg.reps} interleaved runs, `train.workers: auto` = {resolve_workers('auto')} "
        f"here, torch threads {torch.get_num_threads()}.",
        f"Machine: {machine()}; 1-minute load average at the end {os.getloadavg()[0]:.1f} "
        "(other processes on the same cores make single runs noisy).",
        "",
        "| stage | workers 0 (s) | workers auto (s) | auto / 0 |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        *[f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items()],
    ])
    print(body)
    write_section("bench/workers", body)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
