"""bench/train's engine-vs-bare-loop comparison (issue 15): the bare loop must do the engine's
work, or the ratio it reports means nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY = {"data": {"synthetic": {"items": 16, "image_size": 32}},
        "train": {"epochs": 2, "batch_size": 8, "workers": 0}}


@pytest.fixture()
def bench_train(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import train

    yield train
    sys.modules.pop("train", None)
    sys.modules.pop("_report", None)


@pytest.mark.slow
def test_bare_loop_trains_the_engines_weights_bit_for_bit(bench_train):
    """Same model, param groups, optimiser, schedule, loss and clipping: the engine and the
    20-line loop end on identical weights (over two epochs: warm-up and cosine both run)."""
    result = bench_train.compare_engine_and_bare(TINY, repeats=1)
    assert result["difference"] == 0.0
    assert result["steps_per_epoch"] == 16 // 2 * 4 // 8  # 8 training identities x 4 views
    for name in ("engine", "bare"):
        (run,) = result["runs"][name]
        assert len(run["segments"]) == result["steps_per_epoch"] * 2
        assert run["train_cpu"] == pytest.approx(sum(run["segments"]))
        assert run["boundaries"] == [result["steps_per_epoch"] - 1]


@pytest.mark.slow
def test_a_changed_bare_loop_is_caught(bench_train, monkeypatch):
    """The weight comparison can fail: a loop at another learning rate ends elsewhere."""
    real = bench_train.bare_stage2

    def other_lr(params, batches, captions):
        from dataclasses import replace

        return real(replace(params, train=replace(params.train, lr=params.train.lr * 1.01)),
                    batches, captions)

    monkeypatch.setattr(bench_train, "bare_stage2", other_lr)
    assert bench_train.compare_engine_and_bare(TINY, repeats=0)["difference"] > 0


def test_a_new_section_goes_after_the_named_one(bench_train, tmp_path, monkeypatch):
    import _report

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## bench/train\n\nA\n\n## bench/search\n\nB\n",
                    encoding="utf-8")
    monkeypatch.setattr(_report, "BENCHMARKS", path)
    _report.write_section("bench/train: engine", "C", after="bench/train")
    _report.write_section("bench/train", "A2")
    assert path.read_text(encoding="utf-8") == (
        "# Benchmarks\n\n## bench/train\n\nA2\n\n## bench/train: engine\n\nC\n\n"
        "## bench/search\n\nB\n")
