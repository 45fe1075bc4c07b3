"""bench/train: is data loading ever the bottleneck of training?

Trains Stage 2 (image tower against cached text features: the least compute per image, so the
most demanding on the data path) and Stage 4 (PK sampler, identity losses) on the default
synthetic data set, once through the real data path (prepared PNGs, decoding, augmentation,
DataLoader with ``train.workers``) and once on the same batches already in memory. Target
(issue 4): real / in-memory images per second >= 0.9.

With a GPU (issue 7) it also measures Stage 4 training throughput of ``ViT-B-16`` at 224 px
(random weights: the speed does not depend on them) in fp32 and bf16, written to its own
section ``bench/train (GPU)``; ``--gpu-only`` skips the CPU part.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from clipid.config import load_params, params_from_dict
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


def gpu_throughput(work: Path) -> int:
    """Stage 4 images/s of ViT-B-16 at 224 px, fp32 against bf16, batches held in memory so
    that the figure is the model's, not the PNG decoder's. One warm-up epoch per precision
    (CUDA context, cuDNN/cuBLAS autotuning, allocator) runs before the timed epochs."""
    device = torch.device("cuda")
    raw = {"model": {"name": "ViT-B-16", "pretrained": ""},
           "data": {"synthetic": {"items": 1024, "views": 4, "image_size": 224},
                    "cache_size": 224, "workers": 8},
           "train": {"epochs": EPOCHS, "batch_size": 128, "pk_k": 4},
           "stage4": {"init": "pretrained"}}
    prepared = work / "prepared-224"
    base = params_from_dict(raw)
    prepare(base, prepared, work / "data-224.json")
    clean_captions(base, prepared / "manifest.csv", prepared / "image_texts.json",
                   work / "captions-224.json")
    rows = []
    speeds = {}
    def run(precision: str, epochs: int, tag: str) -> tuple[Trainer, float]:
        params = params_from_dict({**raw, "train": {
            **raw["train"], "epochs": epochs, "precision": precision, "channels_last": True}})
        trainer = InMemoryTrainer(params, "stage4", device=device, prepared=prepared,
                                  models_dir=work / f"gpu-{precision}-{tag}",
                                  resume_dir=work / "resume" / f"gpu-{precision}-{tag}")
        return trainer, trainer.fit().seconds

    for precision in ("fp32", "bf16"):
        run(precision, 1, "warmup")
        torch.cuda.reset_peak_memory_stats(device)
        trainer, seconds = run(precision, EPOCHS, "timed")
        steps = len(trainer.data.rows("train")) // base.train.batch_size
        speeds[precision] = EPOCHS * steps * base.train.batch_size / seconds
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(f"| {precision} | {speeds[precision]:.0f} | {peak:.1f} |")
    body = "\n".join([
        f"Stage 4 (CE + triplet + center, PK sampler), `ViT-B-16` at 224 px from random "
        f"weights, global batch {base.train.batch_size}, {EPOCHS} timed epochs of {steps} steps "
        "after one warm-up epoch, channels-last, batches in memory (TF32 matmuls left at "
        "PyTorch's default, i.e. off, for fp32).",
        f"Device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}; "
        f"{machine()}.",
        "",
        "| precision | images/s | peak GPU memory (GiB) |",
        "|---|---:|---:|",
        *rows,
        "",
        f"bf16 / fp32: {speeds['bf16'] / speeds['fp32']:.2f}x",
    ])
    print(body)
    write_section("bench/train (GPU)", body)
    return 0


def main() -> int:
    if "--gpu-only" in sys.argv[1:]:
        if not torch.cuda.is_available():
            print("bench/train --gpu-only: no CUDA device", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as tmp:
            return gpu_throughput(Path(tmp))
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
        with tempfile.TemporaryDirectory() as tmp:
            gpu_throughput(Path(tmp))
    else:
        print("bench/train: no CUDA device, so no ViT-B-16 fp32/bf16 figures", file=sys.stderr)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
