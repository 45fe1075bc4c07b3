"""What the report says about Stage 1 and how examples.png reads without the markdown."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from clipid.config import params_from_dict
from clipid.stages.report import HIT, MISS, _plot_examples, describe_stage


def test_stage1_is_called_random_weights_when_there_are_no_pretrained_weights() -> None:
    random = params_from_dict({"model": {"pretrained": ""}, "train": {"seed": 3}})
    assert describe_stage(random, "stage1") == "random weights (seed 3), no training"
    assert "pretrained" not in describe_stage(random, "stage1")
    weights = params_from_dict({"model": {"name": "ViT-B-16", "pretrained": "openai"}})
    assert describe_stage(weights, "stage1") == "pretrained model (openai), no training"


def test_examples_png_has_column_headers_and_a_legend(tmp_path: Path) -> None:
    for i in range(4):
        Image.new("RGB", (30, 30), (60 * i, 90, 200)).save(tmp_path / f"{i}.png")
    examples = {"stage2": [{"query": "0.png", "gallery": ["1.png", "2.png", "3.png"],
                            "hits": [True, False, True]}]}
    _plot_examples(examples, tmp_path, tmp_path / "examples.png", size=80)
    pixels = np.asarray(Image.open(tmp_path / "examples.png").convert("RGB"))
    # The headers: dark text above the label column, the query and each of the three ranks.
    header = pixels[:20].min(axis=2) < 100
    columns = [(0, 70), (70, 150), *((158 + 80 * c, 238 + 80 * c) for c in range(3))]
    assert all(header[:, a:b].any() for a, b in columns)
    assert pixels.shape[0] == 20 + 80 + 20  # header band, one row, legend band
    legend = pixels[-20:].reshape(-1, 3)
    for colour in (HIT, MISS):
        assert (legend == colour).all(axis=1).any()
