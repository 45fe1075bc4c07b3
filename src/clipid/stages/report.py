"""Stage ``report``: every stage side by side.

Reads only what the evaluation stages wrote (``metrics/<stage>.json``, the CMC curves and the
ranked examples) plus the prepared images, so it reruns in seconds whenever any stage changes.
Writes ``metrics/report.md``, ``metrics/report/cmc.png`` and ``metrics/report/examples.png``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from clipid.config import Params
from clipid.errors import ClipidError
from clipid.stage_registry import get_stage, resolve, stage_spec
from clipid.tracking import Tracker
from clipid.workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["describe_clipreid", "describe_stage", "report", "report_table"]

HIT, MISS = (40, 170, 60), (210, 40, 40)


def describe_stage(params: Params, stage: str) -> str:
    """One line of what a stage does, built from its params (never out of date): a training
    stage's from its description (or the registry's ``describe``), another's is its title."""
    info = get_stage(stage)
    if info.describe is not None:
        return resolve(info.describe)(params)
    if info.kind != "train":
        return info.title
    spec = stage_spec(params, stage)
    towers = " + ".join(t for t, on in (("image", spec.train_image), ("text", spec.train_text))
                        if on)
    terms = []
    if spec.contrastive:
        terms.append(spec.loss)
    terms += [name for name, w in (("CE", spec.id_weight), ("triplet", spec.triplet_weight),
                                   ("center", spec.center_weight)) if w > 0]
    return f"{towers} tower{'s' if '+' in towers else ''}; {' + '.join(terms)}; " \
           f"{spec.sampler} sampler; from {spec.init}"


def describe_clipreid(params: Params) -> str:
    """CLIP-ReID's image stage: its prompts, then the terms of its image stage."""
    cfg = params.clipreid
    prompts = (f"{cfg.n_ctx} learnt tokens per identity" if cfg.prompts == "learned"
               else f"fixed {cfg.fixed_source}")
    terms = [name for name, w in (("i2t CE", cfg.i2t_weight), ("CE", cfg.id_weight),
                                  ("triplet", cfg.triplet_weight), ("center", cfg.center_weight))
             if w > 0]
    return f"CLIP-ReID: prompts ({prompts}), then image tower; {' + '.join(terms)}; " \
           f"pk sampler; from {cfg.init}"


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClipidError(f"{path}: missing; run the stage's evaluation first") from None
    except json.JSONDecodeError as exc:
        raise ClipidError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc


def _cell(block: dict[str, float], key: str) -> str:
    if key not in block:
        return "–"
    std = block.get(f"{key}_std", 0.0)
    return f"{100 * block[key]:.1f} ± {100 * std:.1f}" if std else f"{100 * block[key]:.1f}"


def _columns(metrics: dict[str, dict]) -> list[tuple[str, str, str]]:
    """``(block, key, header)`` of every figure the stages report: the i2i R@K the evaluation
    wrote (``eval.ranks``), mAP, mINP and, with ``eval.verification``, TPR at FPR and EER;
    then t2i R1, mAP and mINP."""
    keys = [k for m in metrics.values() for k in m.get("i2i", {}) if not k.endswith("_std")]
    ranks = sorted({k for k in keys if k[0] == "R" and k[1:].isdigit()}, key=lambda k: int(k[1:]))
    rates = [k for k in dict.fromkeys(keys) if k.startswith("TPR_at_FPR_")] + \
        (["EER"] if "EER" in keys else [])
    headers = {k: f"TPR@FPR {k.rsplit('_', 1)[1]}" if k != "EER" else k for k in rates}
    return ([("i2i", k, f"i2i {k}") for k in [*ranks, "mAP", "mINP"]]
            + [("i2i", k, f"i2i {headers[k]}") for k in rates]
            + [("t2i", k, f"t2i {k}") for k in ("R1", "mAP", "mINP")])


def report_table(params: Params, stages: list[str], metrics: dict[str, dict]) -> str:
    """The Markdown table of every stage (percentages; ± the std over query/gallery draws)."""
    columns = _columns({s: metrics[s] for s in stages})
    lines = ["| stage | what it trains | " + " | ".join(h for _, _, h in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for stage in stages:
        m = metrics[stage]
        cells = " | ".join(_cell(m.get(block, {}), key) for block, key, _ in columns)
        lines.append(f"| {stage} | {describe_stage(params, stage)} | {cells} |")
    return "\n".join(lines)


def _plot_cmc(curves: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on CI or servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for stage, curve in curves.items():
        ax.plot([p["rank"] for p in curve], [p["cmc"] for p in curve], label=stage)
    ax.set_xlabel("rank")
    ax.set_ylabel("CMC (image to image)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    # No software/date metadata: the same curves give the same bytes.
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


def _tile(path: Path, size: int, frame: tuple[int, int, int] | None) -> Image.Image:
    with Image.open(path) as im:
        tile = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    if frame is not None:
        ImageDraw.Draw(tile).rectangle([0, 0, size - 1, size - 1], outline=frame, width=4)
    return tile


def _plot_examples(examples: dict[str, list[dict]], images: Path, out: Path,
                   size: int = 80) -> None:
    """One row per (query, stage): the query, then its top-k gallery images framed green for
    the same identity and red for another."""
    rows = []
    for i in range(max(len(v) for v in examples.values())):
        rows += [(stage, exs[i]) for stage, exs in examples.items() if i < len(exs)]
    top_k = max(len(ex["gallery"]) for _, ex in rows)
    label_w, gap = 70, 8
    canvas = Image.new("RGB", (label_w + (top_k + 1) * size + gap, len(rows) * size), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (stage, ex) in enumerate(rows):
        y = r * size
        draw.text((4, y + size // 2 - 5), stage, fill="black")
        canvas.paste(_tile(images / ex["query"], size, None), (label_w, y))
        for c, (name, hit) in enumerate(zip(ex["gallery"], ex["hits"], strict=True)):
            canvas.paste(_tile(images / name, size, HIT if hit else MISS),
                         (label_w + gap + (c + 1) * size, y))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)


def report(params: Params, stages: list[str], workspace: Workspace | None = None) -> Path:
    """Write the report; returns the path of ``report.md``."""
    workspace = workspace or Workspace()
    metrics = {s: _load_json(workspace.stage_metrics(s)) for s in stages}
    curves = {s: _load_json(workspace.stage_cmc(s)) for s in stages}
    examples = {s: _load_json(workspace.stage_examples(s)) for s in stages}
    figures = workspace.report_figures
    _plot_cmc(curves, figures / "cmc.png")
    _plot_examples(examples, workspace.prepared, figures / "examples.png")

    first = metrics[stages[0]]
    draws = first.get("draws", 1)
    text = [
        "# clipid report",
        "",
        f"Data: `{params.data.source}`, {first['queries']} queries x {first['gallery']} gallery "
        f"images{f', mean ± std over {draws} query/gallery draws' if draws > 1 else ''}. "
        f"Model: `{params.model.name}` ({params.model.pretrained or 'random init'}).",
        "Percentages; i2i = image to image (re-identification protocol), "
        "t2i = text to image (each query's caption against the gallery).",
        "",
        report_table(params, stages, metrics),
        "",
        "![CMC curves](report/cmc.png)",
        "",
        "![Retrieval examples: query, then the top gallery images; green = same identity]"
        "(report/examples.png)",
        "",
    ]
    out = workspace.report
    out.write_text("\n".join(text), encoding="utf-8")
    log.info("report: %s", out)
    with Tracker(stage="report", params=params, run_name="report") as tracker:
        for path in (out, figures / "cmc.png", figures / "examples.png"):
            tracker.log_artifact(path, "report")
    return out
