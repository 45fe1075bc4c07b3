"""Batch augmentation on tensors (``train.augment_device: batch``): shapes, seeding, and the
statistics of the per-image PIL path it replaces (torchvision's RandomResizedCrop and
RandomErasing draws)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torchvision import transforms as T

from clipid.config import params_from_dict
from clipid.data.batch_augment import BatchAugment, sample_crops, sample_erasing
from clipid.models.checkpoint import load_checkpoint
from clipid.training.engine import Trainer

from conftest import prepare_data, workspace_over

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def augment(**kw) -> BatchAugment:
    args = {"crop_scale": 0.7, "flip": True, "random_erasing": 0.25, **kw}
    return BatchAugment(32, MEAN, STD, **args)


def images(n: int = 8, h: int = 40, w: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_shapes_and_seeded_determinism():
    batch = images()
    a = augment()(batch, torch.Generator().manual_seed(1))
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, augment()(batch, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, augment()(batch, torch.Generator().manual_seed(2)))


def test_identity_settings_only_normalise():
    """A full-image crop of the same size, no flip, no erasing: exactly Normalize(ToTensor)."""
    batch = images(4, 32, 32)
    out = augment(crop_scale=1.0, flip=False, random_erasing=0.0, ratio=(1.0, 1.0))(
        batch, torch.Generator().manual_seed(0))
    expected = T.Normalize(MEAN, STD)(batch.float() / 255.0)
    assert torch.allclose(out, expected, atol=1e-5)


def test_flip_probability_is_one_half():
    batch = images(1, 32, 32).expand(2000, -1, -1, -1)
    plain = augment(crop_scale=1.0, flip=False, random_erasing=0.0, ratio=(1.0, 1.0))
    flipping = augment(crop_scale=1.0, random_erasing=0.0, ratio=(1.0, 1.0))
    reference = plain(batch[:1], torch.Generator())[0]
    out = flipping(batch, torch.Generator().manual_seed(3))
    flipped = torch.tensor([torch.allclose(o, reference.flip(-1), atol=1e-5) for o in out])
    kept = torch.tensor([torch.allclose(o, reference, atol=1e-5) for o in out])
    assert bool((flipped ^ kept).all())
    assert abs(flipped.float().mean().item() - 0.5) < 0.04  # 4 sigma of 2000 draws


def test_crops_follow_random_resized_crop():
    gen = torch.Generator().manual_seed(0)
    boxes = sample_crops(4000, 60, 80, (0.7, 1.0), (3 / 4, 4 / 3), gen)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 80).all()
                and (boxes[:, 3] <= 60).all())
    area = (w * h / (60 * 80))
    ours = area.mean().item()
    torch.manual_seed(0)
    reference = T.RandomResizedCrop(32, scale=(0.7, 1.0))
    theirs = sum(hh * ww for _, _, hh, ww in (reference.get_params(
        torch.zeros(3, 60, 80), reference.scale, reference.ratio) for _ in range(4000)))
    assert abs(ours - theirs / 4000 / (60 * 80)) < 0.01
    assert area.min().item() > 0.7 - 0.03 and area.max().item() <= 1.0


def test_erasing_probability_and_box_sizes():
    gen = torch.Generator().manual_seed(0)
    boxes = sample_erasing(4000, 32, 0.25, gen)
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).float() / 32 ** 2
    erased = areas > 0
    # A box is drawn with p = 0.25; a draw whose ten tries all fail erases nothing (rare).
    assert 0.21 < erased.float().mean().item() < 0.27
    assert areas[erased].min().item() >= 0.01 and areas[erased].max().item() <= 0.36
    out = augment(random_erasing=1.0)(images(16), torch.Generator().manual_seed(5))
    zero_share = (out == 0).all(dim=1).float().mean(dim=(1, 2))
    assert bool((zero_share >= 0.01).all() and (zero_share <= 0.36).all())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_data(params_from_dict({"data": {"synthetic": {"items": 16, "views": 4,
                                                                 "image_size": 48},
                                                   "cache_size": 32, "workers": 0}}),
                        tmp_path_factory.mktemp("batchaug"))


def _train(prepared: Path, models: Path, workers: int) -> dict[str, torch.Tensor]:
    params = params_from_dict({"train": {"epochs": 1, "batch_size": 8, "pk_k": 2,
                                         "workers": workers, "augment_device": "batch"},
                               "stage4": {"init": "stage1"}})
    trainer = Trainer(params, "stage4", device=torch.device("cpu"),
                      workspace=workspace_over(prepared, models))
    return load_checkpoint(trainer.fit().checkpoint)[0]


@pytest.mark.slow
def test_training_with_batch_augmentation_is_deterministic(prepared, tmp_path):
    a, b = _train(prepared, tmp_path / "a", 0), _train(prepared, tmp_path / "b", 1)
    assert a.keys() == b.keys()
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert not math.isnan(float(next(iter(a.values())).sum()))
