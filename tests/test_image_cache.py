"""The uint8 image cache (``train.image_cache``): decoded once, rebuilt when the data params
or the manifest change, and training from it learns what training from the PNGs learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clipid.config import params_from_dict
from clipid.data import image_cache
from clipid.data.dataset import PreparedData
from clipid.data.image_cache import cache_key, ensure_image_cache, open_image_cache
from clipid.models.checkpoint import load_checkpoint
from clipid.models.factory import create_model
from clipid.training.data import decode_transform
from clipid.training.engine import Trainer

from conftest import prepare_data, workspace_over

DATA = {"synthetic": {"items": 16, "views": 4, "image_size": 48}, "cache_size": 32,
        "workers": 0}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_data(params_from_dict({"data": DATA}), tmp_path_factory.mktemp("cache"))


def _build(prepared: Path, cache_dir: Path, data: dict) -> Path:
    params = params_from_dict({"data": data})
    clip = create_model("clipid-vit-tiny", "", seed=0)
    rows = PreparedData.load(prepared).rows("train")
    key = cache_key(params.data, prepared / "manifest.csv", list(rows["image"]), 64)
    return ensure_image_cache("train", key, [prepared / p for p in rows["image"]], 64,
                              decode_transform(clip), cache_dir)


def test_the_cache_holds_the_decoded_images_and_is_built_once(prepared, tmp_path, monkeypatch):
    path = _build(prepared, tmp_path, DATA)
    cached = open_image_cache(path)
    rows = PreparedData.load(prepared).rows("train")
    assert cached.shape == (len(rows), 3, 64, 64) and cached.dtype == np.uint8
    from PIL import Image

    decode = decode_transform(create_model("clipid-vit-tiny", "", seed=0))
    with Image.open(prepared / rows["image"].iloc[5]) as im:
        assert np.array_equal(cached[5], decode(im.convert("RGB")).numpy())

    def no_decoding(*args, **kwargs):
        raise AssertionError("an existing cache was decoded again")

    monkeypatch.setattr(image_cache.Image, "open", no_decoding)
    assert _build(prepared, tmp_path, DATA) == path


def test_changed_data_params_build_a_new_cache_and_drop_the_stale_one(prepared, tmp_path):
    old = _build(prepared, tmp_path, DATA)
    new = _build(prepared, tmp_path, {**DATA, "cache_format": "jpg"})
    assert new != old and new.is_file() and not old.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [new.name]


def test_a_changed_manifest_changes_the_key(prepared, tmp_path):
    params = params_from_dict({"data": DATA})
    images = list(PreparedData.load(prepared).rows("train")["image"])
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes((prepared / "manifest.csv").read_bytes())
    before = cache_key(params.data, manifest, images, 64)
    manifest.write_bytes(manifest.read_bytes() + b"\n")
    assert cache_key(params.data, manifest, images, 64) != before
    assert cache_key(params.data, prepared / "manifest.csv", images[::-1], 64) != before


def _train(prepared: Path, models: Path, cache: bool, workers: int) -> dict:
    params = params_from_dict({"train": {"epochs": 1, "batch_size": 8, "pk_k": 2,
                                         "workers": workers, "augment_device": "batch",
                                         "image_cache": cache},
                               "stage4": {"init": "stage1"}})
    workspace = workspace_over(prepared, models)
    trainer = Trainer(params, "stage4", device=torch.device("cpu"), workspace=workspace)
    return load_checkpoint(trainer.fit().checkpoint)[0]


@pytest.mark.slow
def test_training_from_the_cache_learns_what_training_from_pngs_learns(prepared, tmp_path):
    pngs = _train(prepared, tmp_path / "png", cache=False, workers=0)
    cached = _train(prepared, tmp_path / "npy", cache=True, workers=1)
    assert list((tmp_path / "npy" / ".clipid" / "image-cache").glob("train-*.npy"))
    assert all(torch.equal(v, cached[k]) for k, v in pngs.items())
