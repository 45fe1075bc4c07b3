"""bench/export: embedding throughput of onnxruntime against torch on CPU.

Both towers of the default model (``clipid-vit-tiny``, 64 px) and of ``ViT-B-16`` at 224 px
(random weights: ``open_clip.create_model('ViT-B-16', pretrained=None)``, nothing downloaded),
exported by ``clipid.deploy.onnx``. The same batch, the same number of threads for both
runtimes; the contenders alternate within each round and the best round of each counts.

No target in issue 16: the figures say what a deployment gains or loses by ONNX on CPU. The
script exits non-zero only when the two runtimes disagree (max |diff| > 1e-4).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

import clipid.models  # noqa: F401 - registers clipid's architectures with open_clip
from clipid.deploy.onnx import ImageEncoder, TextEncoder, export_model
from clipid.models.factory import ClipModel, create_model

from _report import machine, write_section

MODELS = {"clipid-vit-tiny": 32, "ViT-B-16": 8}   # architecture -> image batch
TEXT_BATCH = 32


def best_rate(run, rows: int, repeats: int) -> float:
    """Rows per second of the fastest of ``repeats`` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return rows / best


def compare(session: onnxruntime.InferenceSession, encoder: torch.nn.Module,
            inputs: torch.Tensor, rounds: int, repeats: int) -> tuple[float, float, float]:
    """(torch rows/s, onnxruntime rows/s, max |difference|), contenders interleaved."""
    name = session.get_inputs()[0].name
    feed = {name: inputs.numpy()}
    encoder.eval()

    def run_torch() -> np.ndarray:
        with torch.inference_mode():
            return encoder(inputs).numpy()

    def run_onnx() -> np.ndarray:
        return session.run(None, feed)[0]

    diff = float(np.abs(run_torch() - run_onnx()).max())  # also the warm-up of both
    torch_rate = onnx_rate = 0.0
    for _ in range(rounds):
        torch_rate = max(torch_rate, best_rate(run_torch, len(inputs), repeats))
        onnx_rate = max(onnx_rate, best_rate(run_onnx, len(inputs), repeats))
    return torch_rate, onnx_rate, diff


def bench_model(name: str, batch: int, threads: int, rounds: int, repeats: int,
                work: Path) -> list[tuple[str, int, float, float, float]]:
    clip: ClipModel = create_model(name, "", seed=0)
    paths = export_model(clip, "bench", work / name)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    size = clip.image_size
    generator = torch.Generator().manual_seed(0)
    cases = [("image", paths[0], ImageEncoder(clip.model),
              torch.randn(batch, 3, size, size, generator=generator))]
    if paths[1].name == "text.onnx":
        words = ["a red striped shirt", "blue denim jeans", "a white dress with lace"]
        texts = [words[i % 3] + f" number {i}" for i in range(TEXT_BATCH)]
        cases.append(("text", paths[1], TextEncoder(clip.model), clip.tokenizer(texts)))
    rows = []
    for tower, path, encoder, inputs in cases:
        session = onnxruntime.InferenceSession(str(path), options,
                                               providers=["CPUExecutionProvider"])
        rates = compare(session, encoder, inputs, rounds, repeats)
        rows.append((f"`{name}` {tower}", len(inputs), *rates))
        print(f"{name} {tower}: torch {rates[0]:.1f}/s, onnxruntime {rates[1]:.1f}/s, "
              f"max |diff| {rates[2]:.1e}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the default model only, 1 round")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # "initialized randomly" on purpose
    torch.set_num_threads(args.threads)
    models = {"clipid-vit-tiny": MODELS["clipid-vit-tiny"]} if args.quick else MODELS
    rounds = 1 if args.quick else args.rounds
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        for name, batch in models.items():
            rows += bench_model(name, batch, args.threads, rounds, args.repeats, Path(tmp))
    table = [f"| {what} | {n} | {t:.1f} | {o:.1f} | {o / t:.2f}x | {d:.1e} |"
             for what, n, t, o, d in rows]
    body = "\n".join([
        "Embedding throughput (rows/s) of the exported towers (`clipid export`, TorchScript "
        "exporter, opset 17, L2-normalised output) in onnxruntime against the same module in "
        f"torch (`inference_mode`), CPU, {args.threads} thread(s) each, same batch; "
        f"interleaved, best of {rounds} rounds x {args.repeats} calls. Random weights.",
        f"Machine: {machine()}; onnxruntime {onnxruntime.__version__}; load average "
        f"{os.getloadavg()[0]:.1f} at the end (other jobs share the cores: absolute rates "
        "shrink with it, the interleaved ratio much less).",
        "",
        "| tower | batch | torch | onnxruntime | onnxruntime / torch | max abs diff |",
        "|---|---:|---:|---:|---:|---:|",
        *table,
    ])
    print(body)
    if not args.quick:
        write_section("bench/export", body)
    return 0 if all(d <= 1e-4 for *_, d in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
