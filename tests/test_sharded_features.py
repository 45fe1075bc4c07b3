"""Evaluation and the gallery index with the images split across 2 gloo processes write the
same bytes as one process: the ranks embed the very batches one process would, rank 0 gathers
them in manifest order."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipid.config import EvalParams, FaissParams, params_from_dict
from clipid.data.dataset import PreparedData
from clipid.evaluation import evaluate, write_results
from clipid.features import image_features
from clipid.models.factory import create_model
from clipid.search.gallery import GalleryIndex
from clipid.stages.launch import cli_launch_command, needs_launch

from conftest import prepare_data

WORLD = 2
# 5 images a batch over 32 test images: 7 batches, so the ranks get 4 and 3.
EVAL = EvalParams(batch_size=5, flip=True)
FAISS = FaissParams(type="hnsw", hnsw_m=8)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    params = params_from_dict({"data": {"synthetic": {"items": 16, "views": 4,
                                                      "image_size": 48},
                                        "cache_size": 32, "workers": 0}})
    return prepare_data(params, tmp_path_factory.mktemp("sharded"))


def _outputs(prepared: Path, out: Path) -> None:
    """What the evaluate and index stages write, from whichever rank holds the results."""
    torch.manual_seed(0)
    clip = create_model("clipid-vit-tiny", "", seed=0)
    data = PreparedData.load(prepared)
    result = evaluate(clip, data, EVAL)
    for backend in ("exact", "faiss"):
        gallery = GalleryIndex.build(clip, "stage1", data, EVAL, backend, FAISS)
        if gallery is not None:
            gallery.save(out / "index" / backend)
    if result is not None:
        write_results(result, out / "stage1.json", out / "cmc.json", {}, out / "examples.json")


def _worker(rank: int, store: str, prepared: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        _outputs(Path(prepared), Path(out))
    finally:
        dist.destroy_process_group()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "store"}


def test_two_ranks_write_the_bytes_of_one_process(prepared, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    torch.set_num_threads(1)
    _outputs(prepared, single)
    sharded.mkdir()
    mp.spawn(_worker, args=(str(sharded / "store"), str(prepared), str(sharded)),
             nprocs=WORLD, join=True)
    one, two = _files(single), _files(sharded)
    assert "stage1.json" in one and "index/faiss/faiss.index" in one
    assert one.keys() == two.keys()
    for name, content in one.items():
        assert content == two[name], f"{name} differs between 1 and {WORLD} processes"


def _gather_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        paths = [Path(out) / f"{i}.png" for i in range(7)]
        feats = image_features(_RankEncoder(), paths, _grey_level, batch_size=2, shard=True)
        torch.save(feats, f"{out}/feats.{rank}")
    finally:
        dist.destroy_process_group()


class _RankEncoder(torch.nn.Module):
    """The image's grey level as its embedding, next to the rank that computed it."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        ranks = torch.full((len(images),), float(dist.get_rank() + 1))
        return torch.stack([images[:, 0, 0, 0], ranks], dim=1)


def _grey_level(im) -> torch.Tensor:
    return torch.full((3, 1, 1), float(im.getpixel((0, 0))[0]))


def test_rank0_gathers_the_batches_in_path_order(tmp_path):
    from PIL import Image

    for i in range(7):
        Image.new("RGB", (2, 2), (i, i, i)).save(tmp_path / f"{i}.png")
    mp.spawn(_gather_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD,
             join=True)
    rank0 = torch.load(tmp_path / "feats.0")
    assert torch.load(tmp_path / "feats.1") is None
    # 4 batches of 2, 2, 2, 1 images: batches 0 and 2 on rank 0, 1 and 3 on rank 1.
    ranks = torch.tensor([1.0, 1, 2, 2, 1, 1, 2])
    expected = torch.nn.functional.normalize(torch.stack([torch.arange(7.0), ranks], 1), dim=-1)
    assert torch.equal(rank0, expected)


def test_evaluate_and_index_launch_themselves_under_torchrun(monkeypatch):
    params = params_from_dict({"train": {"nproc": 2}})
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert needs_launch(params)
    command = cli_launch_command(params, ["evaluate", "stage4"], Path("params.yaml"))
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in command and command[-4:] == [
        "evaluate", "stage4", "--params", "params.yaml"]


def _run_index(work: Path, prepared: Path, nproc: int) -> dict[str, bytes]:
    import os
    import subprocess

    import yaml

    (work / "data").mkdir(parents=True)
    (work / "data" / "prepared").symlink_to(prepared)
    raw = {"data": {"synthetic": {"items": 16, "views": 4, "image_size": 48}, "cache_size": 32,
                    "workers": 0},
           "train": {"nproc": nproc},
           "eval": {"batch_size": 5},
           "search": {"model": {"image": "stage1", "text": "stage1"}, "backend": "faiss",
                      "faiss": {"type": "hnsw", "hnsw_m": 8}}}
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["DVC_ROOT"] = str(work)
    done = subprocess.run([sys.executable, "-m", "clipid", "index"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("torch.distributed.run" in done.stderr) == (nproc > 1)
    return _files(work / "models" / "index")


@pytest.mark.slow
def test_clipid_index_with_train_nproc_writes_the_single_process_index(prepared, tmp_path):
    """``clipid index`` with ``train.nproc: 2`` relaunches itself under torchrun; the gallery
    index it writes is byte for byte the one process's."""
    one = _run_index(tmp_path / "one", prepared, 1)
    two = _run_index(tmp_path / "two", prepared, WORLD)
    assert "stage1/faiss.index" in one and one.keys() == two.keys()
    for name, content in one.items():
        assert content == two[name], f"{name} differs under torchrun"
