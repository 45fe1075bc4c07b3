"""bench/tracking: what share of a training stage goes to MLflow tracking?

Trains Stage 2 on the default synthetic data set and model for ``EPOCHS`` epochs with the
pipeline's tracking: one run opened on the repository's SQLite store, loss and learning rate
logged every ``train.log_every`` steps plus per-epoch means, then the checkpoint's hashes, the
weights and the sidecar. Every tracking call is timed inside the stage, so the share is exact
for that run rather than the difference of two noisy stage times. The stage runs alone, then as
4 processes at once on one store (``dvc queue start -j 4``), each round on a store of its own
whose schema exists already (a one-off per repository, timed apart). Importing MLflow is
timed apart too: a stage that does not track never imports it. Target: none set by the issue;
the figures say what tracking costs. Each worker runs in its own process, as a DVC stage does.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clipid.config import params_from_dict

from _report import machine, write_section

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
PARALLEL = 4


def worker(root: Path, prepared: Path, out: Path) -> None:
    """One tracked Stage 2, timing its tracking calls; writes the timings to ``out``."""
    import torch

    from clipid.tracking import Tracker
    from clipid.training.engine import Trainer
    from clipid.workspace import Workspace

    params = params_from_dict({"train": {"epochs": EPOCHS}})
    parts = {"import": 0.0, "open": 0.0, "log": 0.0, "checkpoint": 0.0, "close": 0.0}
    calls = 0
    start = time.perf_counter()
    import mlflow  # noqa: F401  (what a tracked stage pays once; one that doesn't track, never)

    parts["import"] = time.perf_counter() - start
    tracker = Tracker(stage="train_stage2", params=params, run_name="stage2")
    tracker.__enter__()
    parts["open"] = time.perf_counter() - start - parts["import"]

    def on_log(metrics: dict[str, float], step: int) -> None:
        nonlocal calls
        began = time.perf_counter()
        tracker.log_metrics(metrics, step=step)
        parts["log"] += time.perf_counter() - began
        calls += 1

    workspace = Workspace(root)
    workspace.prepared.parent.mkdir(parents=True, exist_ok=True)
    workspace.prepared.symlink_to(prepared.resolve(), target_is_directory=True)
    trainer = Trainer(params, "stage2", device=torch.device("cpu"), workspace=workspace,
                      on_log=on_log)
    result = trainer.fit()
    began = time.perf_counter()
    tracker.log_checkpoint(result.checkpoint, result.seconds)
    parts["checkpoint"] = time.perf_counter() - began
    began = time.perf_counter()
    tracker.__exit__(None, None, None)
    parts["close"] = time.perf_counter() - began
    total = time.perf_counter() - start
    out.write_text(json.dumps({"total": total, "parts": parts, "calls": calls,
                               "spooled": tracker.spooled is not None}))


def run_workers(count: int, root: Path, prepared: Path) -> list[dict]:
    """``count`` tracked stages at once, each in a folder of its own, one store (``root``)."""
    from clipid.tracking import mlflow_client, tracking_uri

    mlflow_client(tracking_uri(root))  # the schema: a one-off, timed on its own in main()
    env = {**os.environ, "DVC_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs, outs = [], []
    for number in range(count):
        folder = root / f"w{number}"
        folder.mkdir(parents=True)
        outs.append(folder / "timing.json")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(folder),
                                       str(prepared), str(outs[-1])], env=env))
    for proc in procs:
        if proc.wait():
            raise SystemExit(f"bench/tracking: a worker exited with code {proc.returncode}")
    return [json.loads(out.read_text()) for out in outs]


def row(label: str, timings: list[dict]) -> str:
    shares = [sum(t["parts"].values()) / t["total"] for t in timings]
    parts = {k: statistics.mean(t["parts"][k] for t in timings) for k in timings[0]["parts"]}
    total = statistics.mean(t["total"] for t in timings)
    spooled = sum(t["spooled"] for t in timings)
    return (f"| {label} | {total:.1f} | {parts['import']:.2f} | {parts['open']:.2f} "
            f"| {parts['log']:.2f} "
            f"({timings[0]['calls']} calls) | {parts['checkpoint']:.2f} | {parts['close']:.2f} "
            f"| {100 * statistics.mean(shares):.1f}% (max {100 * max(shares):.1f}%) "
            f"| {spooled} |")


def main(rounds: int) -> int:
    import mlflow

    from clipid.config import load_params
    from clipid.stages.clean_captions import clean_captions
    from clipid.stages.prepare import prepare
    from clipid.workspace import Workspace

    defaults = load_params(REPO / "params.yaml")
    params = params_from_dict({"train": {"epochs": EPOCHS}})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        workspace = Workspace(work)
        prepare(params, workspace)
        prepared = workspace.prepared
        began = time.perf_counter()
        run_workers(0, work / "schema", prepared)
        schema = time.perf_counter() - began
        clean_captions(params, workspace)
        # Interleaved, best round by tracking share; every round gets a new store.
        results: dict[str, list[list[dict]]] = {"single": [], "parallel": []}
        for round_ in range(rounds):
            results["single"].append(run_workers(1, work / f"single{round_}", prepared))
            results["parallel"].append(run_workers(PARALLEL, work / f"par{round_}", prepared))
        for label, key in (("1 stage", "single"), (f"{PARALLEL} stages at once", "parallel")):
            best = min(results[key], key=lambda ts: statistics.mean(
                sum(t["parts"].values()) / t["total"] for t in ts))
            rows.append(row(label, best))
    body = "\n".join([
        f"Stage 2 on the default synthetic data set and model (`{params.model.name}`, batch "
        f"{params.train.batch_size}, {EPOCHS} epochs, `train.log_every` = "
        f"{defaults.train.log_every}, checkpoint uploaded), CPU, each stage in its own process "
        "on a SQLite store of its round (WAL); "
        f"best of {rounds} interleaved round(s). Times in seconds, means over the stages of a "
        "round.",
        f"Machine: {machine()}, MLflow {mlflow.__version__}.",
        "",
        "| run | stage | import MLflow | open run | step logging | checkpoint "
        "(hashes + upload) | close | tracking share of the stage | runs spooled |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Creating a new store's schema (once per repository, before the rounds): "
        f"{schema:.1f} s.",
    ])
    print(body)
    write_section("bench/tracking", body)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
        sys.exit(0)
    # --rounds N: interleaved rounds, best one reported (default 2; 1 on a crowded machine)
    sys.exit(main(int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv
                  else 2))
