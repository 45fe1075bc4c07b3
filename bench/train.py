"""bench/train: is data loading ever the bottleneck of training?

Trains Stage 2 (image tower against cached text features: the least compute per image, so the
most demanding on the data path) and Stage 4 (PK sampler, identity losses) on the default
synthetic data set, once through the real data path (prepared PNGs, decoding, augmentation,
DataLoader with ``train.workers``) and once on the same batches already in memory. Target
(issue 4): real / in-memory images per second >= 0.9.

With a GPU (issues 7 and 18) it also measures Stage 2 and Stage 4 training of ``ViT-B-16`` at
224 px (random weights: the speed does not depend on them) in fp32 and bf16, through the real
data path and from memory, with MFU (``clipid.flops``), peak memory and the torch/CUDA versions,
written to its own section ``bench/train (GPU)``; ``--gpu-only`` skips the CPU part, ``--profile``
adds a ``torch.profiler`` summary of one step. ``--device cpu --model clipid-vit-tiny ...``
runs the same report on CPU (a check of the script; nothing is written).

``--engine-vs-bare`` (issue 15): Stage 2 through the engine and through a plain open_clip loop of
the same work, on the same batches held in memory, interleaved; target engine / bare >= 0.95.
``--profile-overhead`` adds a cProfile of one run of each, the engine's extra work by cause.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from clipid.config import load_params, params_from_dict
from clipid.data.dataset import PreparedData
from clipid.data.loader import resolve_workers
from clipid.features import text_features
from clipid.flops import mfu, peak_bf16_flops, train_step_flops
from clipid.models.factory import create_model
from clipid.stage_registry import PRETRAINED
from clipid.stages.clean_captions import clean_captions
from clipid.stages.prepare import prepare
from clipid.training.engine import Trainer
from clipid.training.losses import SupConLoss
from clipid.training.schedule import param_groups, warmup_cosine
from clipid.training.towers import set_trainable, tower_parameters
from clipid.workspace import Workspace

from _report import machine, write_section

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
ENGINE_VS_BARE = "bench/train: engine vs a bare loop (issue 15)"


class InMemoryTrainer(Trainer):
    """The same training, fed from batches decoded and augmented before the clock starts."""

    def make_loader(self, dataset, sampler, batch_size):
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)
        return list(loader)


def make_trainer(trainer_cls, params, stage: str, device, work: Path, tag: str, **extra):
    """A trainer over the data prepared under ``work`` (:func:`prepare_data`), in a workspace
    of its own (checkpoint, resume state) whose ``data/prepared`` links to the shared one."""
    root = work / "runs" / tag
    (root / "data").mkdir(parents=True, exist_ok=True)
    if not (root / "data" / "prepared").exists():
        (root / "data" / "prepared").symlink_to(Workspace(work).prepared.resolve())
    return trainer_cls(params, stage, device=device, workspace=Workspace(root), **extra)


def prepare_data(params, work: Path) -> Path:
    """prepare + clean_captions into ``work/data/prepared`` (the ``Workspace`` layout)."""
    prepare(params, Workspace(work))
    clean_captions(params, Workspace(work))
    return Workspace(work).prepared


def images_per_second(trainer_cls, params, stage: str, work: Path) -> float:
    torch.manual_seed(0)
    trainer = make_trainer(trainer_cls, params, stage, torch.device("cpu"), work,
                           trainer_cls.__name__)
    result = trainer.fit()
    images = EPOCHS * (len(trainer.data.rows("train")) // params.train.batch_size) \
        * params.train.batch_size
    return images / result.seconds


class ProfiledTrainer(Trainer):
    """The real data path with ``torch.profiler`` stepping once per batch: skip one step, warm
    one, record one (``PROFILE_SCHEDULE``)."""

    profiler = None

    def make_loader(self, dataset, sampler, batch_size):
        return _Stepping(super().make_loader(dataset, sampler, batch_size), self.profiler)


class _Stepping:
    def __init__(self, loader, profiler):
        self.loader, self.profiler = loader, profiler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch
            self.profiler.step()


def versions(device: torch.device) -> str:
    if device.type != "cuda":
        return f"Device: CPU, torch {torch.__version__}; {machine()}."
    return (f"Device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; {machine()}.")


def _timed(trainer_cls, params, stage: str, device, work: Path, tag: str):
    trainer = make_trainer(trainer_cls, params, stage, device, work, tag)
    seconds = trainer.fit().seconds
    steps = len(trainer.data.rows("train")) // params.train.batch_size
    if trainer.spec.sampler == "pk":
        steps = trainer.data.rows("train")["item_id"].nunique() // (
            params.train.batch_size // params.train.pk_k)
    return trainer, params.train.epochs * steps * params.train.batch_size / seconds


def device_rows(cfg: argparse.Namespace, device: torch.device, work: Path) -> tuple[list, dict]:
    """Per stage and precision: images/s through the real data path and from memory, MFU of
    each against the device's dense bf16 peak, and peak memory."""
    raw = {"model": {"name": cfg.model, "pretrained": ""},
           "data": {"synthetic": {"items": cfg.items, "views": 4, "image_size": cfg.image_size},
                    "cache_size": cfg.image_size, "workers": min(8, os.cpu_count() or 1)},
           "train": {"epochs": cfg.epochs, "batch_size": cfg.batch, "pk_k": 4,
                     "workers": "auto", "channels_last": True, "tf32": cfg.tf32,
                     "augment_device": cfg.augment_device},
           "stage2": {"init": PRETRAINED}, "stage4": {"init": PRETRAINED}}
    base = params_from_dict(raw)
    prepare_data(base, work)
    peak = peak_bf16_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    rows, speeds = [], {}
    for stage in cfg.stages:
        spec = getattr(base, stage)
        flops = train_step_flops(cfg.model, cfg.batch, train_image=spec.train_image,
                                 train_text=spec.train_text)
        for precision in cfg.precisions:
            params = params_from_dict({**raw, "train": {**raw["train"], "precision": precision}})
            warm = params_from_dict({**raw, "train": {**raw["train"], "precision": precision,
                                                      "epochs": 1}})
            _timed(InMemoryTrainer, warm, stage, device, work, f"{stage}-{precision}-w")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _, memory = _timed(InMemoryTrainer, params, stage, device, work,
                               f"{stage}-{precision}-m")
            _, real = _timed(Trainer, params, stage, device, work, f"{stage}-{precision}-r")
            gib = torch.cuda.max_memory_allocated(device) / 2**30 \
                if device.type == "cuda" else float("nan")
            mfus = [mfu(flops, s / cfg.batch, peak) for s in (real, memory)]
            speeds[(stage, precision)] = (real, memory, *mfus)
            shown = " | ".join("n/a" if m is None else f"{100 * m:.1f}%" for m in mfus)
            rows.append(f"| {stage} | {precision} | {real:.0f} | {memory:.0f} | "
                        f"{real / memory:.2f} | {shown} | {gib:.1f} |")
    return rows, speeds


def profile_summary(cfg: argparse.Namespace, device: torch.device, work: Path) -> str:
    """``torch.profiler`` of one training step (real data path, the first listed stage and
    precision), its top operators by self time."""
    from torch.profiler import ProfilerActivity, profile, schedule

    stage, precision = cfg.stages[0], cfg.precisions[0]
    raw = {"model": {"name": cfg.model, "pretrained": ""},
           "train": {"epochs": 1, "batch_size": cfg.batch, "pk_k": 4, "workers": "auto",
                     "precision": precision, "channels_last": True, "tf32": cfg.tf32,
                     "augment_device": cfg.augment_device},
           stage: {"init": PRETRAINED}}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    steps = schedule(wait=1, warmup=1, active=1, repeat=1)
    with profile(activities=activities, schedule=steps) as prof:
        ProfiledTrainer.profiler = prof
        _timed(ProfiledTrainer, params_from_dict(raw), stage, device, work, "profile")
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=cfg.profile_rows)
    return f"One step of {stage} in {precision}, sorted by {key}:\n\n```\n{table}\n```"


def device_report(cfg: argparse.Namespace) -> int:
    """The ``--gpu-only`` benchmark (also runnable on CPU with ``--device cpu`` for a check)."""
    device = torch.device(cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows, _ = device_rows(cfg, device, work)
        profile = profile_summary(cfg, device, work) if cfg.profile else ""
    body = "\n".join([
        f"`{cfg.model}` at {cfg.image_size} px from random weights, global batch {cfg.batch}, "
        f"{cfg.epochs} timed epochs after one warm-up epoch, channels-last, TF32 "
        f"{'on' if cfg.tf32 else 'off'}, augmentation on the {cfg.augment_device}; "
        "real data path = prepared PNGs through the pipeline's "
        f"loader (`train.workers: auto` = {resolve_workers('auto')}). MFU: analytic model "
        "FLOPs (clipid.flops: trained tower 3 forwards, cached frozen text none) over the "
        "device's dense bf16 peak.",
        versions(device),
        "",
        "| stage | precision | real data path (img/s) | in memory (img/s) | ratio | MFU real |"
        " MFU in memory | peak memory (GiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])
    print(body)
    if profile:
        print(profile)
    if device.type == "cuda" and not cfg.no_write:
        write_section("bench/train (GPU)", body)
        if profile:
            write_section("bench/train (GPU profile)", profile)
    return 0


# ---------------------------------------------------------------- engine vs a bare loop (issue 15)

class _Captured(Exception):
    def __init__(self, batches: list):
        super().__init__("batches captured")
        self.batches = batches


class _CapturingTrainer(Trainer):
    """Decodes and augments the engine's own first epoch into memory, then stops ``fit``."""

    def make_loader(self, dataset, sampler, batch_size):
        raise _Captured(InMemoryTrainer.make_loader(self, dataset, sampler, batch_size))


class _HeldBatches:
    """The held batches, every epoch, with the wall and CPU clocks read as each batch is handed
    out: the first reading tells the set-up (model, text features, fingerprint) from the
    training, and the gap between two batches is one step (across an epoch boundary: the step
    plus that epoch's bookkeeping)."""

    def __init__(self, batches: list):
        self.batches, self.wall, self.cpu = batches, [], []
        self.epoch_starts: list[int] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.epoch_starts.append(len(self.wall))
        for batch in self.batches:
            self.wall.append(time.perf_counter())
            self.cpu.append(time.process_time())
            yield batch

    def timing(self, start: float, end: tuple[float, float]) -> dict:
        """Set-up and training seconds (wall and CPU); ``segments``: every step's CPU seconds,
        the last one up to the training call's return (checkpoint included)."""
        cpu = [*self.cpu, end[1]]
        return {"setup": self.wall[0] - start, "train": end[0] - self.wall[0],
                "train_cpu": end[1] - self.cpu[0],
                "segments": [b - a for a, b in zip(cpu, cpu[1:], strict=False)],
                "boundaries": [i - 1 for i in self.epoch_starts[1:]]}


class HeldBatchesTrainer(Trainer):
    """The engine, fed the batches given to it (``held``) instead of a loader."""

    held: _HeldBatches

    def make_loader(self, dataset, sampler, batch_size):
        return self.held


def bare_stage2(params, batches, captions: list[str]) -> torch.nn.Module:
    """Stage 2 as a plain open_clip loop: the engine's model, param groups, optimiser, schedule,
    loss and clipping, nothing else; returns the trained model."""
    spec, cfg = params.stage2, params.train
    clip = create_model(params.model.name, params.model.pretrained, seed=cfg.seed)
    model, epochs = clip.model, spec.epochs or cfg.epochs
    text = text_features(model, clip.tokenizer, captions)  # the frozen text tower, once
    set_trainable(model, image=True, text=False, scale=True)
    lr = cfg.lr * spec.lr_mult
    groups = param_groups(tower_parameters(model, "image"), lr, cfg.weight_decay, "image") \
        + param_groups(tower_parameters(model, "scale"), lr, 0.0, "scale")
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = warmup_cosine(optimizer, round(cfg.warmup_epochs * len(batches)),
                              epochs * len(batches))
    trained, supcon = [p for g in groups for p in g["params"]], SupConLoss()
    for _ in range(epochs):
        for images, labels, caption_ids, _cameras in batches:
            feats = F.normalize(model.encode_image(images), dim=-1)
            scale = model.logit_scale.exp().clamp(max=100)
            loss = spec.contrastive_weight * supcon(feats, text[caption_ids], labels, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
    return model


def train_captions(work: Path) -> list[str]:
    """The captions the engine caches text features of, in its caption-index order."""
    data = PreparedData.load(work / "data" / "prepared")
    return sorted(set(data.captions(data.rows("train"))))


def run_engine(params, batches: list, work: Path) -> dict:
    """One engine run, timed from outside as :func:`run_bare` is: set-up from ``fit``'s call to
    its first batch, training from there to its return (steps, per-epoch bookkeeping and
    resume state, final checkpoint). ``steps``: the engine's own ``TrainResult.seconds``."""
    trainer = make_trainer(HeldBatchesTrainer, params, "stage2", torch.device("cpu"), work,
                           "engine")
    trainer.held = _HeldBatches(batches)
    start = time.perf_counter()
    result = trainer.fit()
    end = time.perf_counter(), time.process_time()
    return {**trainer.held.timing(start, end), "steps": result.seconds,
            "model": getattr(trainer, "model", None)}


def run_bare(params, batches: list, captions: list[str]) -> dict:
    held = _HeldBatches(batches)
    start = time.perf_counter()
    model = bare_stage2(params, held, captions)
    end = time.perf_counter(), time.process_time()
    timing = held.timing(start, end)
    return {**timing, "steps": timing["train"], "model": model}


def _capture_batches(params, work: Path) -> list:
    try:
        make_trainer(_CapturingTrainer, params, "stage2", torch.device("cpu"), work,
                     "capture").fit()
    except _Captured as captured:
        return captured.batches
    raise RuntimeError("the engine never asked for its loader")


@contextlib.contextmanager
def held_runners(params):
    """Both contenders over one set of held batches, in a temporary workspace."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare_data(params, work)
        batches, captions = _capture_batches(params, work), train_captions(work)
        yield {"engine": lambda: run_engine(params, batches, work),
               "bare": lambda: run_bare(params, batches, captions)}, batches


def _max_weight_difference(a: torch.nn.Module | None, b: torch.nn.Module) -> float | None:
    if a is None:
        return None
    theirs = dict(b.named_parameters())
    return max(float((p.detach() - theirs[n].detach()).abs().max())
               for n, p in a.named_parameters())


def compare_engine_and_bare(raw: dict, repeats: int) -> dict:
    """``repeats`` timed runs of each on one set of held batches, interleaved (the order flips
    every round: E B B E E B ...), after one untimed warm-up run of each, whose final weights
    must agree (the bare loop does the engine's work, nothing less)."""
    params = params_from_dict(raw)
    runs: dict[str, list[dict]] = {"engine": [], "bare": []}
    with held_runners(params) as (runners, batches):
        loads = [os.getloadavg()[0]]
        warm = {name: run() for name, run in runners.items()}
        difference = _max_weight_difference(warm["engine"]["model"], warm["bare"]["model"])
        del warm
        for round_no in range(repeats):
            for name in ("engine", "bare")[::1 if round_no % 2 == 0 else -1]:
                run = runners[name]()
                del run["model"]
                runs[name].append(run)
                loads.append(os.getloadavg()[0])
    epochs = params.stage2.epochs or params.train.epochs
    return {"runs": runs, "images": epochs * len(batches) * params.train.batch_size,
            "steps_per_epoch": len(batches), "epochs": epochs, "difference": difference,
            "loads": loads, "params": params}


def _summary(runs: list[dict]) -> dict[str, float]:
    """Best of the runs (wall and CPU), and where the CPU-best run's time goes: its median
    step, and the time beyond that at epoch ends and after the last batch."""
    best = min(runs, key=lambda r: r["train_cpu"])
    segments = best["segments"]
    ordinary = sorted(g for i, g in enumerate(segments[:-1]) if i not in best["boundaries"])
    median = ordinary[len(ordinary) // 2]
    return {"train": min(r["train"] for r in runs), "train_cpu": best["train_cpu"],
            "setup": min(r["setup"] for r in runs), "steps": min(r["steps"] for r in runs),
            "median_step": median,
            "epoch_end": sum(segments[i] - median for i in best["boundaries"]),
            "end": segments[-1] - median}


def engine_vs_bare_report(raw: dict, repeats: int) -> tuple[str, bool, float]:
    """The markdown section, whether the engine reaches 0.95x the bare loop's images/s, and the
    engine's best training seconds."""
    result = compare_engine_and_bare(raw, repeats)
    params, images = result["params"], result["images"]
    engine, bare = (_summary(result["runs"][k]) for k in ("engine", "bare"))
    # The check reads the CPU clock: on this shared machine the wall clock of a run swings by
    # 15% with the other jobs' load, far more than the 5% the target allows.
    ratio = bare["train_cpu"] / engine["train_cpu"]
    rows = [(label, *(f"{fmt(s)}" for s in (engine, bare)), f"{rate(engine, bare):.3f}")
            for label, fmt, rate in [
                ("training wall s, best run", lambda s: f"{s['train']:.2f}",
                 lambda e, b: b["train"] / e["train"]),
                ("images/s (best run)", lambda s: f"{images / s['train']:.1f}",
                 lambda e, b: b["train"] / e["train"]),
                ("training CPU s, best run", lambda s: f"{s['train_cpu']:.2f}",
                 lambda e, b: b["train_cpu"] / e["train_cpu"]),
                ("images/s of CPU time (best run)", lambda s: f"{images / s['train_cpu']:.1f}",
                 lambda e, b: b["train_cpu"] / e["train_cpu"]),
                ("set-up + training wall s", lambda s: f"{s['setup'] + s['train']:.2f}",
                 lambda e, b: (b["setup"] + b["train"]) / (e["setup"] + e["train"])),
                ("median step, CPU s (best run)", lambda s: f"{s['median_step']:.3f}",
                 lambda e, b: b["median_step"] / e["median_step"]),
            ]]
    diff = result["difference"]
    same = "not compared (the trainer keeps no model)" if diff is None else (
        f"max |weight difference| {diff:.1e}" + (" (bit-identical)" if diff == 0 else ""))
    loads = result["loads"]
    extra_epoch = (engine["epoch_end"] - bare["epoch_end"]) / max(1, result["epochs"] - 1)
    body = "\n".join([
        f"Stage 2 (image tower against the cached features of the frozen text tower, SupCon, "
        f"AdamW with the engine's param groups, warm-up + cosine, grad clip "
        f"{params.train.grad_clip}) of `{params.model.name}` on the default synthetic data set: "
        f"batch {params.train.batch_size}, {result['steps_per_epoch']} steps x "
        f"{result['epochs']} epochs = {images} images per run, on the same batches decoded "
        "and augmented into memory before any clock starts. Contenders: the engine "
        "(`Trainer.fit`, `make_loader` returning the held batches, no MLflow) and a plain "
        "open_clip loop of the same work (`bare_stage2`: encode_image, normalise, SupConLoss "
        "against the cached text features, backward, clip, AdamW step, scheduler step). "
        f"{repeats} timed runs of each, interleaved with the order flipping every round, after "
        "one warm-up run of each; best run per contender. Both timed from outside the same "
        "way: training = from the first batch handed out to the call's return (the engine's "
        "per-epoch resume state and final checkpoint included; model creation, text features "
        "and the fingerprint are set-up), on the wall clock and on the process's CPU clock "
        "(torch runs one thread, so CPU time is the work done, without the waits for a core "
        "that other jobs cause). Ratio = bare seconds / engine seconds = engine images/s / "
        "bare images/s.",
        f"Machine: {machine()}; open_clip {open_clip.__version__}, torch threads "
        f"{torch.get_num_threads()}; shared with other jobs (noisy): 1-minute load average "
        f"{min(loads):.2f}-{max(loads):.2f} during the runs.",
        "",
        "| | engine | bare loop | engine / bare |",
        "|---|---:|---:|---:|",
        *[f"| {label} | {e} | {b} | {r} |" for label, e, b, r in rows],
        "",
        f"Final weights after the warm-up runs: engine vs bare loop {same}.",
        f"Where the engine's extra time goes (CPU-best runs, CPU time): per step "
        f"{1e3 * (engine['median_step'] - bare['median_step']):+.1f} ms (median step), per "
        f"epoch end {extra_epoch:+.3f} s, after the last step {engine['end'] - bare['end']:+.3f}"
        " s (checkpoint, resume folder); the engine's own `TrainResult.seconds` "
        f"(steps only) {engine['steps']:.2f} s.",
        "",
        f"- [{'x' if ratio >= 0.95 else ' '}] engine >= 0.95x the bare loop's images/s "
        "(training CPU time, best run; the wall clock is shown above)",
    ])
    return body, ratio >= 0.95, engine["train"]


# The loop's own modules (the engine of today and of issue 15's refactor); what they call
# (resume state, schedule, towers, losses, tqdm, torch) shows by callee.
_LOOP_FILES = ("engine.py", "loop.py", "objective.py", "trainstate.py", "epoch.py")


def _callee_times(stats: pstats.Stats, is_caller) -> tuple[list[tuple[str, int, float]], float]:
    """Cumulative seconds of every function called *from* the caller frames, by callee, and
    the callers' own (self) seconds: where a loop's time goes, one level down."""
    by_callee: dict[str, list] = {}
    own = 0.0
    for func, (_, _, self_seconds, _, callers) in stats.stats.items():
        if is_caller(func):
            own += self_seconds
            continue
        for caller, (_, calls, _, cumulative) in callers.items():
            if is_caller(caller):
                key = func[2] if func[0] == "~" else f"{os.path.basename(func[0])}:{func[2]}"
                entry = by_callee.setdefault(key, [0, 0.0])
                entry[0] += calls
                entry[1] += cumulative
    rows = sorted(((k, n, t) for k, (n, t) in by_callee.items()), key=lambda r: -r[2])
    return rows, own


def profile_overhead(raw: dict, rows: int = 20) -> str:
    """cProfile of one engine run and one bare run (after a warm-up of each) on the same held
    batches: what each loop calls, with calls and cumulative seconds (set-up included)."""
    params = params_from_dict(raw)
    with held_runners(params) as (runners, _):
        for run in runners.values():
            run()
        profiles = {}
        for name, run in runners.items():
            profiler = cProfile.Profile()
            profiler.enable()
            timing = run()
            profiler.disable()
            profiles[name] = (pstats.Stats(profiler), timing)
    callers = {
        "engine": lambda f: "clipid" in f[0] and os.path.basename(f[0]) in _LOOP_FILES,
        "bare": lambda f: f[2] == "bare_stage2",
    }
    out = ["cProfile of one run of each (set-up included; profiling slows Python calls, "
           "not the tensor kernels):", ""]
    for name, (stats, timing) in profiles.items():
        callees, own = _callee_times(stats, callers[name])
        out += [f"{name}: set-up {timing['setup']:.2f} s, training {timing['train']:.2f} s; "
                f"the loop's own Python (self time) {own:.3f} s", "",
                "| callee | calls | cumulative s |", "|---|---:|---:|",
                *[f"| `{k}` | {n} | {t:.3f} |" for k, n, t in callees[:rows]], ""]
    return "\n".join(out)


def _each(fn, calls: int) -> float:
    """Seconds per call of ``fn``: the best of 3 rounds of ``calls`` calls."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def _stage2_parts(params, batches: list, captions: list[str]) -> dict:
    """A Stage 2 model, optimiser (with state: one step taken) and one step's loss."""
    spec, cfg = params.stage2, params.train
    clip = create_model(params.model.name, params.model.pretrained, seed=cfg.seed)
    model = clip.model
    text = text_features(model, clip.tokenizer, captions)
    set_trainable(model, image=True, text=False, scale=True)
    groups = param_groups(tower_parameters(model, "image"), cfg.lr, cfg.weight_decay, "image") \
        + param_groups(tower_parameters(model, "scale"), cfg.lr, 0.0, "scale")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = warmup_cosine(optimizer, 1, 10)
    images, labels, caption_ids = batches[0]
    feats = F.normalize(model.encode_image(images), dim=-1)
    loss = spec.contrastive_weight * SupConLoss()(feats, text[caption_ids], labels,
                                                  model.logit_scale.exp().clamp(max=100))
    loss.backward(retain_graph=True)
    optimizer.step()
    return {"clip": clip, "model": model, "optimizer": optimizer, "scheduler": scheduler,
            "loss": loss}


def overhead_parts(params, batches: list, captions: list[str], work: Path
                   ) -> list[tuple[str, str, float]]:
    """What each extra of today's engine (beyond the bare loop) costs, timed alone:
    ``(what, when, seconds)`` with when ``step``, ``epoch`` or ``run``."""
    import io
    import shutil

    from tqdm import tqdm

    from clipid.models.checkpoint import save_checkpoint
    from clipid.runtime import autocast, grad_scaler
    from clipid.training.state import save_state

    parts = _stage2_parts(params, batches, captions)
    model, optimizer, loss = parts["model"], parts["optimizer"], parts["loss"]
    cpu = torch.device("cpu")
    scaler, terms = grad_scaler(torch.float32, cpu), {"supcon": loss}
    wrapper = torch.nn.Identity()
    sums: dict[str, float] = {}

    def readout() -> None:  # the per-step loss figures: a host read of every term
        values = {k: float(v.detach()) for k, v in terms.items()}
        values["loss"] = float(loss.detach())
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v

    def scaler_calls() -> None:  # disabled in fp32, still called every step
        scaler.scale(loss)
        scaler.unscale_(optimizer)
        scaler.update()

    def in_autocast() -> None:
        with autocast(cpu, torch.float32):
            pass

    progress = tqdm(range(10**9), file=io.StringIO(), leave=False)
    ticks = iter(progress)

    def tqdm_step() -> None:  # tqdm's iteration and set_postfix (which forces a refresh)
        next(ticks)
        progress.set_postfix(loss=f"{1.234:.3f}")

    state = {"epoch": 1, "history": [], "seconds": 0.0, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": parts["scheduler"].state_dict(),
             "scaler": scaler.state_dict()}
    weights = dict(model.state_dict())
    meta = {"architecture": parts["clip"].architecture, "params": {}}

    def checkpoint() -> None:
        save_checkpoint(weights, work / "bench-ckpt" / "model.safetensors", meta)
        shutil.rmtree(work / "bench-resume", ignore_errors=True)

    rows = [
        ("loss figures read to the host per step (`float(v.detach())` per term and the total,"
         " `sums` dict)", "step", _each(readout, 2000)),
        ("tqdm iteration + `set_postfix` per step (a forced refresh)", "step",
         _each(tqdm_step, 2000)),
        ("GradScaler calls while disabled (scale, unscale_, update; step = optimizer.step)",
         "step", _each(scaler_calls, 2000)),
        ("`autocast` context (fp32: a generator context manager)", "step",
         _each(in_autocast, 2000)),
        ("one extra `nn.Module` call (the `_Towers` wrapper)", "step",
         _each(lambda: wrapper(loss), 2000)),
        ("`sum(terms.values())` (one more tensor add)", "step",
         _each(lambda: sum(terms.values()), 2000)),
        ("clip list rebuilt per step (`[p for g in param_groups ...]`)", "step",
         _each(lambda: [p for g in optimizer.param_groups for p in g["params"]], 2000)),
        ("`set_trainable` + `torch.manual_seed` per epoch", "epoch",
         _each(lambda: (set_trainable(model, image=True, text=False, scale=True),
                        torch.manual_seed(1)), 20)),
        ("resume state per epoch (`save_state`: model + AdamW moments to disk)", "epoch",
         _each(lambda: save_state(state, work / "bench-resume"), 3)),
        ("final checkpoint + removing the resume folder", "run", _each(checkpoint, 3)),
    ]
    progress.close()
    return rows


def overhead_table(raw: dict, engine_seconds: float) -> str:
    """:func:`overhead_parts` per run of ``raw``'s Stage 2, as shares of ``engine_seconds``."""
    params = params_from_dict(raw)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare_data(params, work)
        batches, captions = _capture_batches(params, work), train_captions(work)
        rows = overhead_parts(params, batches, captions, work)
    epochs = params.stage2.epochs or params.train.epochs
    count = {"step": epochs * len(batches), "epoch": epochs, "run": 1}
    lines = [f"The extras of the engine before issue 15's refactor (main at 556c66c) beyond the "
             f"bare loop, each timed alone (best of 3 rounds) "
             f"and counted per run ({count['step']} steps, {epochs} epochs); share of the "
             f"engine's best training time ({engine_seconds:.2f} s):", "",
             "| extra | when | ms each | per run s | share |", "|---|---|---:|---:|---:|"]
    total = 0.0
    for what, when, seconds in rows:
        per_run = seconds * count[when]
        total += per_run
        lines.append(f"| {what} | {when} | {1e3 * seconds:.3f} | {per_run:.3f} | "
                     f"{100 * per_run / engine_seconds:.2f}% |")
    lines.append(f"| all of them | | | {total:.3f} | {100 * total / engine_seconds:.2f}% |")
    return "\n".join(lines)


def write_engine_vs_bare(cfg: argparse.Namespace) -> bool:
    raw = {"train": {"epochs": cfg.epochs, "workers": 0}}
    body, ok, engine_seconds = engine_vs_bare_report(raw, cfg.repeats)
    if cfg.profile_overhead:
        body += "\n\n" + overhead_table(raw, engine_seconds)
        body += "\n\n" + profile_overhead(raw, cfg.profile_rows)
    print(body)
    if not cfg.no_write:
        write_section(ENGINE_VS_BARE, body, after="bench/train")
    return ok


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-only", action="store_true", help="only the device benchmark")
    parser.add_argument("--engine-vs-bare", action="store_true",
                        help="only Stage 2 through the engine vs a bare loop (issue 15)")
    parser.add_argument("--repeats", type=int, default=4,
                        help="--engine-vs-bare: timed runs of each contender")
    parser.add_argument("--profile-overhead", action="store_true",
                        help="--engine-vs-bare: add a cProfile of one run of each")
    parser.add_argument("--profile", action="store_true", help="torch.profiler of one step")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--items", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--stages", nargs="+", default=["stage2", "stage4"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--tf32", action="store_true", help="train.tf32 for the fp32 rows")
    parser.add_argument("--augment-device", choices=("loader", "batch"), default="loader",
                        help="train.augment_device: PIL in the workers, or tensors on the device")
    parser.add_argument("--profile-rows", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    if cfg.gpu_only:
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            print("bench/train --gpu-only: no CUDA device", file=sys.stderr)
            return 2
        return device_report(cfg)
    if cfg.engine_vs_bare:
        return 0 if write_engine_vs_bare(cfg) else 1
    defaults = load_params(REPO / "params.yaml")
    raw = {"train": {"epochs": EPOCHS, "workers": defaults.train.workers}}
    params = params_from_dict(raw)
    rows, checks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare_data(params, work)
        for stage in ("stage2", "stage4"):
            spec = {"stage4": {"init": PRETRAINED}} if stage == "stage4" else {}
            stage_params = params_from_dict({**raw, **spec})
            real = images_per_second(Trainer, stage_params, stage, work)
            memory = images_per_second(InMemoryTrainer, stage_params, stage, work)
            ratio = real / memory
            rows.append(f"| {stage} | {real:.1f} | {memory:.1f} | {ratio:.2f} |")
            checks[f"{stage}: real data path >= 0.9x in-memory batches"] = ratio >= 0.9
    body = "\n".join([
        f"Default synthetic data set and model (`{params.model.name}`, batch "
        f"{params.train.batch_size}, {EPOCHS} epochs, `train.workers` = {params.train.workers},"
        " CPU).",
        f"Machine: {machine()}.",
        "",
        "| stage | real data path (img/s) | batches in memory (img/s) | ratio |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        *[f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items()],
    ])
    print(body)
    write_section("bench/train", body)
    checks["engine >= 0.95x a bare loop (issue 15)"] = write_engine_vs_bare(cfg)
    if torch.cuda.is_available():
        device_report(cfg)
    else:
        print("bench/train: no CUDA device, so no ViT-B-16 fp32/bf16 figures", file=sys.stderr)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
