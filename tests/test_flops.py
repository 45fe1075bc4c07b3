"""Analytic FLOPs against a hand count and against torch's own FLOP counter."""

from __future__ import annotations

import open_clip
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import clipid.models  # noqa: F401 - registers clipid-vit-tiny with open_clip
from clipid.errors import ClipidError
from clipid.flops import (
    image_tower_shape,
    mfu,
    peak_bf16_flops,
    text_tower_shape,
    tower_forward_flops,
    train_step_flops,
)


def hand_count_tiny_vit() -> int:
    """clipid-vit-tiny's image tower, written out: 64 px, patch 8, width 192, 4 layers,
    MLP 4 x 192 = 768, projection to 128. 8 x 8 = 64 patches plus a class token: 65 tokens.
    Every matrix product of (m x k) by (k x n) costs 2 m k n FLOPs."""
    tokens, width, mlp = 65, 192, 768
    patch_embed = 2 * 64 * (3 * 8 * 8) * 192       # 64 patches, each 192 values -> 192
    qkv = 2 * tokens * width * (3 * width)         # 14,376,960
    scores = 2 * tokens * tokens * width           # 1,622,400 (4 heads of 48 together)
    values = 2 * tokens * tokens * width           # 1,622,400
    out_proj = 2 * tokens * width * width          # 4,792,320
    mlp_fc = 2 * tokens * width * mlp              # 19,169,280
    mlp_proj = 2 * tokens * mlp * width            # 19,169,280
    layer = qkv + scores + values + out_proj + mlp_fc + mlp_proj
    assert layer == 60_752_640
    projection = 2 * width * 128                   # the class token only
    return patch_embed + 4 * layer + projection


def test_tiny_vit_forward_matches_the_hand_count():
    shape = image_tower_shape(clipid.models.get_model_config("clipid-vit-tiny")["vision_cfg"],
                              128)
    assert tower_forward_flops(shape) == hand_count_tiny_vit() == 247_778_304


def test_vit_b16_forward_is_about_35_gflops():
    forward = train_step_flops("ViT-B-16", 1, train_image=False)
    assert 35.0e9 < forward < 35.3e9
    assert train_step_flops("ViT-B-16", 10) == 30 * forward


def _counted(fn, *args) -> int:
    # The math backend spells attention as bmm, which FlopCounterMode counts on CPU.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def test_torch_flop_counter_agrees_on_both_towers():
    torch.manual_seed(0)
    model = open_clip.create_model("clipid-vit-tiny", pretrained=None)
    config = clipid.models.get_model_config("clipid-vit-tiny")
    images, tokens = torch.randn(3, 3, 64, 64), torch.randint(0, 1000, (3, 32))
    image = tower_forward_flops(image_tower_shape(config["vision_cfg"], 128))
    text = tower_forward_flops(text_tower_shape(config["text_cfg"], 128))
    assert _counted(model.encode_image, images) == 3 * image
    assert _counted(model.encode_text, tokens) == 3 * text


def test_non_square_input_and_overlapping_patches_agree_with_torch():
    from clipid.models.geometry import ModelSpec, apply_geometry

    torch.manual_seed(0)
    model = open_clip.create_model("clipid-vit-tiny", pretrained=None)
    apply_geometry(model, ModelSpec(image_size=(96, 48), patch_stride=6))   # 15 x 7 patches
    config = clipid.models.get_model_config("clipid-vit-tiny")
    shape = image_tower_shape(config["vision_cfg"], 128, (96, 48), 6)
    assert shape.patches == 15 * 7
    assert _counted(model.encode_image, torch.randn(3, 3, 96, 48)) == 3 * tower_forward_flops(shape)


def test_training_counts_three_forwards_for_a_trained_tower_and_one_for_a_frozen_one():
    config = clipid.models.get_model_config("clipid-vit-tiny")
    image = tower_forward_flops(image_tower_shape(config["vision_cfg"], 128))
    text = tower_forward_flops(text_tower_shape(config["text_cfg"], 128))
    name = "clipid-vit-tiny"
    assert train_step_flops(name, 4) == 4 * 3 * image                    # stage 2/4: cached text
    assert train_step_flops(name, 4, train_text=True) == 4 * (3 * image + 3 * text)
    assert train_step_flops(name, 4, text_forward=True) == 4 * (3 * image + text)
    assert train_step_flops(name, 4, train_image=False, train_text=True) == 4 * (image + 3 * text)


def test_peak_table_and_mfu():
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA L4") == 121e12 and peak_bf16_flops("NVIDIA L40S") == 362e12
    assert peak_bf16_flops(None) is None and peak_bf16_flops("cpu") is None
    assert mfu(1e12, 100.0, 989e12) == pytest.approx(100e12 / 989e12)
    assert mfu(1e12, 100.0, None) is None


def test_resnet_towers_are_refused_with_a_clear_error():
    with pytest.raises(ClipidError, match="ViT image towers only"):
        train_step_flops("RN50", 1)


@pytest.mark.slow
def test_bench_train_device_report_runs_on_cpu(capsys, monkeypatch):
    """``bench/train.py --gpu-only`` with ``--device cpu``: the report a GPU session will run,
    with its MFU column (n/a: no known peak for a CPU) and the one-step profile."""
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    import train as bench_train

    code = bench_train.main(["--gpu-only", "--device", "cpu", "--model", "clipid-vit-tiny",
                             "--image-size", "64", "--items", "16", "--batch", "8",
                             "--epochs", "1", "--stages", "stage4", "--precisions", "fp32",
                             "--profile", "--profile-rows", "5", "--no-write"])
    out = capsys.readouterr().out
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("| stage4 | fp32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[2]) > 0 and float(cells[3]) > 0 and cells[5] == cells[6] == "n/a"
    assert f"torch {torch.__version__}" in out
    assert "One step of stage4 in fp32" in out and "aten::" in out
    sys.modules.pop("train", None)
