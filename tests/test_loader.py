"""Training loaders: ``train.workers: auto``, persistent workers, per-sample augmentation seeds.

The contract: the trained weights do not depend on the number of workers, and a run killed and
resumed with persistent workers ends bit-identical to a straight run in the main process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipid.config import ConfigError, params_from_dict
from clipid.data import loader as loader_mod
from clipid.data.loader import EpochSeededSampler, make_train_loader, resolve_workers, seeded
from clipid.models.checkpoint import load_checkpoint
from clipid.training.engine import Trainer
from clipid.training.samplers import PKSampler, ShardedRandomSampler

from conftest import prepare_data, workspace_over

CPU = torch.device("cpu")


def raw_params(workers, **train) -> dict:
    # Default augmentation (crop, flip, erasing): the randomness that workers must not change.
    return {"data": {"synthetic": {"items": 16, "views": 4, "image_size": 48}, "cache_size": 32,
                     "workers": 0},
            "train": {"epochs": 2, "batch_size": 8, "pk_k": 2, "log_every": 1,
                      "workers": workers, **train},
            "stage4": {"init": "stage1", "epochs": 2}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_data(params_from_dict(raw_params(0)), tmp_path_factory.mktemp("loader"))


@pytest.mark.parametrize(("cores", "local_world", "expected"),
                         [(1, 1, 0), (2, 1, 1), (8, 1, 7), (8, 2, 3), (2, 2, 0)])
def test_auto_workers_are_the_cores_minus_the_training_loop(monkeypatch, cores, local_world,
                                                            expected):
    monkeypatch.setattr(loader_mod, "available_cores", lambda: cores)
    assert resolve_workers("auto", local_world) == expected
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert resolve_workers("auto") == expected
    assert resolve_workers(3) == 3


def test_workers_param_takes_auto_or_a_count():
    assert params_from_dict({}).train.workers == "auto"
    assert params_from_dict({"train": {"workers": 2}}).train.workers == 2
    with pytest.raises(ConfigError, match="'train.workers'.*allowed values: 'auto'"):
        params_from_dict({"train": {"workers": "many"}})
    with pytest.raises(ConfigError, match="'train.workers' is -1; allowed range"):
        params_from_dict({"train": {"workers": -1}})


def test_sample_seeds_depend_on_epoch_and_index_only():
    base = ShardedRandomSampler(10, seed=3)
    sampler = EpochSeededSampler(base, seed=3)
    epoch0 = dict(sampler)
    sampler.set_epoch(1)
    epoch1 = dict(sampler)
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert all(epoch0[i] != epoch1[i] for i in range(10))
    sampler.set_epoch(0)
    assert dict(sampler) == epoch0                 # a replayed epoch: the same seeds
    # PK batches draw an identity's images with replacement: repeats get their own seed.
    pk = EpochSeededSampler(PKSampler([0, 0, 1, 1], p=2, k=4, seed=0), seed=0)
    pairs = list(pk)
    assert len(pairs) == 8 and len({s for _, s in pairs}) == 8


def test_seeded_leaves_the_callers_generator_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = seeded(11, torch.rand, 2)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(seeded(11, torch.rand, 2), a)


def test_loader_is_persistent_and_prefetching_with_workers_only():
    data = torch.arange(16.0)
    sampler = EpochSeededSampler(ShardedRandomSampler(16), 0)
    threaded = make_train_loader(_Indexed(data), sampler, 4, 2, CPU)
    assert threaded.persistent_workers and threaded.prefetch_factor == loader_mod.PREFETCH_BATCHES
    assert not threaded.pin_memory                    # pinned only for a CUDA device
    inline = make_train_loader(_Indexed(data), sampler, 4, 0, CPU)
    assert not inline.persistent_workers and len(inline) == 4
    assert torch.equal(torch.cat(list(threaded)), torch.cat(list(inline)))


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, data: torch.Tensor):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        return self.data[item[0]]


def _weights(raw: dict, prepared: Path, models: Path, **kwargs) -> dict[str, torch.Tensor]:
    trainer = Trainer(params_from_dict(raw), "stage4", device=CPU,
                      workspace=workspace_over(prepared, models), **kwargs)
    state, _ = load_checkpoint(trainer.fit().checkpoint)
    return state


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), f"{key} differs: {what}"


@pytest.mark.slow
def test_weights_do_not_depend_on_the_number_of_workers(prepared, tmp_path):
    inline = _weights(raw_params(0), prepared, tmp_path / "w0")
    _assert_same(inline, _weights(raw_params(1), prepared, tmp_path / "w1"), "0 vs 1 worker")
    _assert_same(inline, _weights(raw_params("auto"), prepared, tmp_path / "auto"), "0 vs auto")


class _Interrupt(Exception):
    pass


def _kill_at(step: int):
    def on_log(metrics: dict, at: int) -> None:
        if at == step and "train/loss" in metrics:
            raise _Interrupt
    return on_log


@pytest.mark.slow
def test_persistent_workers_resume_to_the_weights_of_a_straight_run(prepared, tmp_path):
    straight = _weights(raw_params(0), prepared, tmp_path / "straight")
    models = tmp_path / "killed"
    with pytest.raises(_Interrupt):
        _weights(raw_params(1), prepared, models, on_log=_kill_at(3))  # 2 steps an epoch
    assert (models / ".clipid" / "resume" / "stage4").is_dir()
    _assert_same(straight, _weights(raw_params(1), prepared, models), "after a resume")
