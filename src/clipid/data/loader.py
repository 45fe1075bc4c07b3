"""Training DataLoaders: worker count, persistence, pinning, and augmentation seeded per sample.

Every sample's augmentation is drawn from its own seed, a function of ``(train.seed, epoch,
image index, how often the index came before in this epoch)``: the batches of epoch N are the
same with 0, 1 or 8 workers, with persistent workers (whose random state would otherwise carry
over from epoch to epoch) and after a resume. The sampler computes the seeds in the main process
and hands each worker ``(index, seed)`` pairs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochSeededSampler", "available_cores", "make_train_loader", "resolve_workers",
           "sample_seed", "seeded"]

PREFETCH_BATCHES = 4  # per worker: enough to ride out one slow PNG without holding much memory


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS and Windows have no affinity masks
        return os.cpu_count() or 1


def resolve_workers(workers: int | str, processes_per_node: int | None = None) -> int:
    """``train.workers`` as a count. ``auto``: the cores one process may use, minus the one its
    training loop runs on, so 0 (decoding in the main process) on a single core, 1 on two, 7 on
    eight; under DDP the node's cores are shared by its ``LOCAL_WORLD_SIZE`` processes."""
    if workers != "auto":
        return int(workers)
    if processes_per_node is None:
        processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(0, available_cores() // max(1, processes_per_node) - 1)


def sample_seed(seed: int, epoch: int, index: int, occurrence: int) -> int:
    """A 63-bit seed for one sample's augmentation (SeedSequence mixes the four words)."""
    state = np.random.SeedSequence([seed, epoch, index, occurrence]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class EpochSeededSampler(Sampler[tuple[int, int]]):
    """Wraps an index sampler (with ``set_epoch``) to yield ``(index, sample_seed)``."""

    def __init__(self, sampler: Any, seed: int):
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seen: dict[int, int] = {}
        for index in self.sampler:
            occurrence = seen.get(index, 0)
            seen[index] = occurrence + 1
            yield index, sample_seed(self.seed, self.epoch, index, occurrence)


def seeded(seed: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with torch's CPU generator seeded by ``seed``, and the caller's generator
    state restored afterwards (with 0 workers the caller is the training loop itself)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args)


def make_train_loader(dataset: Dataset, sampler: Sampler, batch_size: int, workers: int,
                      device: torch.device) -> DataLoader:
    """Full batches from ``workers`` persistent worker processes (0: the main process), each
    keeping ``PREFETCH_BATCHES`` batches ready; pinned host memory for a CUDA device."""
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": PREFETCH_BATCHES}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=workers, pin_memory=device.type == "cuda", **extra)
