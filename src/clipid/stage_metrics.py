"""The numbers of the stages' DVC metrics files in the flat form MLflow takes.

Here, apart from the stages that write them, because ``track`` (run by every ``dvc repro``) and
``register`` read them too: importing an evaluation or index stage imports torch and open_clip,
seconds of start-up that these two stages do not need.
"""

from __future__ import annotations

__all__ = ["eval_metrics", "index_metrics"]


def eval_metrics(metrics: dict) -> dict[str, float]:
    """``{"eval/i2i/mAP": ..., "eval/t2i/R1": ...}`` of an evaluation's ``metrics/<stage>.json``."""
    flat: dict[str, float] = {}
    for block in ("i2i", "t2i"):
        for key, value in metrics.get(block, {}).items():
            flat[f"eval/{block}/{key}"] = float(value)
    flat["eval/queries"] = float(metrics["queries"])
    return flat


def index_metrics(summary: dict[str, dict]) -> dict[str, float]:
    """``{"index/stage4/images": ...}``: the numbers of ``metrics/index.json``."""
    return {f"index/{m}/{k}": float(v) for m, e in summary.items()
            for k, v in e.items() if isinstance(v, (int, float))}
