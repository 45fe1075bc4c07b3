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
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from clipid.config import load_params, params_from_dict
from clipid.data.loader import resolve_workers
from clipid.flops import mfu, peak_bf16_flops, train_step_flops
from clipid.stages.clean_captions import clean_captions
from clipid.stages.prepare import prepare
from clipid.training.engine import Trainer

from _report import machine, write_section

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3


class InMemoryTrainer(Trainer):
    """The same training, fed from batches decoded and augmented before the clock starts."""

    def make_loader(self, dataset, sampler, batch_size):
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)
        return list(loader)


def images_per_second(trainer_cls, params, stage: str, prepared: Path, work: Path) -> float:
    torch.manual_seed(0)
    trainer = trainer_cls(params, stage, device=torch.device("cpu"), prepared=prepared,
                          models_dir=work / trainer_cls.__name__,
                          resume_dir=work / "resume" / trainer_cls.__name__)
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


def _timed(trainer_cls, params, stage: str, device, prepared: Path, work: Path, tag: str):
    trainer = trainer_cls(params, stage, device=device, prepared=prepared,
                          models_dir=work / tag, resume_dir=work / "resume" / tag)
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
           "stage2": {"init": "pretrained"}, "stage4": {"init": "pretrained"}}
    prepared = work / "prepared"
    base = params_from_dict(raw)
    prepare(base, prepared, work / "data.json")
    clean_captions(base, prepared / "manifest.csv", prepared / "image_texts.json",
                   work / "captions.json")
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
            _timed(InMemoryTrainer, warm, stage, device, prepared, work, f"{stage}-{precision}-w")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _, memory = _timed(InMemoryTrainer, params, stage, device, prepared, work,
                               f"{stage}-{precision}-m")
            _, real = _timed(Trainer, params, stage, device, prepared, work,
                             f"{stage}-{precision}-r")
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
           stage: {"init": "pretrained"}}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    steps = schedule(wait=1, warmup=1, active=1, repeat=1)
    with profile(activities=activities, schedule=steps) as prof:
        ProfiledTrainer.profiler = prof
        _timed(ProfiledTrainer, params_from_dict(raw), stage, device, work / "prepared", work,
               "profile")
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-only", action="store_true", help="only the device benchmark")
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
    defaults = load_params(REPO / "params.yaml")
    raw = {"train": {"epochs": EPOCHS, "workers": defaults.train.workers}}
    params = params_from_dict(raw)
    rows, checks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared = work / "prepared"
        prepare(params, prepared, work / "data.json")
        clean_captions(params, prepared / "manifest.csv", prepared / "image_texts.json",
                       work / "captions.json")
        for stage in ("stage2", "stage4"):
            spec = {"stage4": {"init": "pretrained"}} if stage == "stage4" else {}
            stage_params = params_from_dict({**raw, **spec})
            real = images_per_second(Trainer, stage_params, stage, prepared, work)
            memory = images_per_second(InMemoryTrainer, stage_params, stage, prepared, work)
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
    if torch.cuda.is_available():
        device_report(cfg)
    else:
        print("bench/train: no CUDA device, so no ViT-B-16 fp32/bf16 figures", file=sys.stderr)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
