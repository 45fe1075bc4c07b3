"""Samplers of the training stages, each deterministic in ``(seed, epoch)`` and shardable.

Every process of a DDP run builds the same global order from the same seed and takes its own
share, so no sampler state has to be communicated, and a resumed run replays epoch N exactly.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from clipid.errors import ClipidError

__all__ = ["InstancePKSampler", "PKSampler", "SamplerError", "ShardedRandomSampler",
           "instance_batches"]


class SamplerError(ClipidError, ValueError):
    """A batch the training data cannot fill: the user changes the params or the data."""


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(seed, epoch))


def seed_of(seed: int, epoch: int) -> int:
    """The seed of one epoch's draws: mixed rather than seed + epoch, so that (seed 0, epoch 1)
    and (seed 1, epoch 0) differ."""
    return seed * 1_000_003 + epoch


def _check_shard(name: str, rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{name}: rank {rank} is not in [0, world_size={world_size})")


def _identity_groups(name: str, labels: Sequence[int], p: int, k: int, rank: int,
                     world_size: int) -> dict[int, list[int]]:
    """Each identity's indices, in order of first appearance, once the PK shape is checked."""
    if p < 1 or k < 1:
        raise ValueError(f"{name}: p ({p}) and k ({k}) must be at least 1")
    _check_shard(name, rank, world_size)
    by_identity: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_identity.setdefault(int(label), []).append(index)
    if len(by_identity) < p * world_size:
        raise SamplerError(f"{name}: {len(by_identity)} identities cannot fill a batch "
                           f"of p={p} identities on {world_size} process(es); lower "
                           "train.batch_size or raise train.pk_k")
    return by_identity


class ShardedRandomSampler(Sampler[int]):
    """A fresh permutation each epoch; process ``rank`` takes every ``world_size``-th index,
    padded by wrapping around so that every process has the same number of steps."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError("ShardedRandomSampler: no samples")
        _check_shard("ShardedRandomSampler", rank, world_size)
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch = 0
        self.per_rank = -(-n // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=_generator(self.seed, self.epoch)).tolist()
        total = self.per_rank * self.world_size
        order += order[: total - len(order)]
        return iter(order[self.rank:total:self.world_size])


class PKSampler(Sampler[int]):
    """Batches of ``p`` identities x ``k`` images, as batch-hard triplet and center losses need.

    Each epoch shuffles the identities and cuts them into groups of ``p`` (an incomplete last
    group is dropped); each identity of a group gives ``k`` of its images, drawn without
    replacement when it has at least ``k`` and with replacement otherwise. Under DDP, group
    ``b`` goes to process ``b % world_size`` (truncated so every process gets as many), so the
    global batch is ``world_size x p x k``. Use with ``batch_size = p * k``.
    """

    def __init__(self, labels: Sequence[int], p: int, k: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.by_identity = _identity_groups("PKSampler", labels, p, k, rank, world_size)
        self.identities = sorted(self.by_identity)
        self.p, self.k, self.seed = p, k, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.batches_per_rank = len(self.identities) // p // world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_rank * self.p * self.k

    def __iter__(self) -> Iterator[int]:
        gen = _generator(self.seed, self.epoch)
        order = [self.identities[i]
                 for i in torch.randperm(len(self.identities), generator=gen).tolist()]
        out: list[int] = []
        for b in range(self.batches_per_rank * self.world_size):
            group = order[b * self.p:(b + 1) * self.p]
            # Drawn for every group on every process, so all processes stay in step.
            picks = []
            for identity in group:
                pool = self.by_identity[identity]
                if len(pool) >= self.k:
                    chosen = torch.randperm(len(pool), generator=gen)[: self.k]
                else:
                    chosen = torch.randint(len(pool), (self.k,), generator=gen)
                picks += [pool[i] for i in chosen.tolist()]
            if b % self.world_size == self.rank:
                out += picks
        return iter(out)


class InstancePKSampler(Sampler[int]):
    """The PK epoch of CLIP-ReID, TransReID and torchreid (``RandomIdentitySampler``): every
    identity's images are shuffled and cut into groups of ``k`` (an identity with fewer than
    ``k`` images draws ``k`` with replacement; a last incomplete group is dropped), and batches
    take one group from each of ``p`` identities drawn from those with groups left, until fewer
    than ``p`` have any. So an epoch covers every image about once (Market-1501's 12,936 images:
    about 180 batches of 64) instead of one group per identity (:class:`PKSampler`: 46).

    The draws are those of the published sampler, made from a ``random.Random`` and a
    ``numpy.random.RandomState`` seeded by ``(seed, epoch)`` instead of the global generators,
    so an epoch is the same after a resume. The epoch's order is built in ``set_epoch``, so
    ``len`` is exact (the number of batches varies by one or two from epoch to epoch). Under
    DDP, batch ``b`` goes to process ``b % world_size`` (truncated so every process gets as many).
    """

    def __init__(self, labels: Sequence[int], p: int, k: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.by_identity = _identity_groups("InstancePKSampler", labels, p, k, rank,
                                            world_size)
        self.p, self.k, self.seed = p, k, seed
        self.rank, self.world_size = rank, world_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        mixed = seed_of(self.seed, epoch)
        batches = instance_batches(self.by_identity, self.p, self.k, random.Random(mixed),
                                   np.random.RandomState(mixed % 2**32))
        per_rank = len(batches) // self.world_size
        mine = batches[self.rank:per_rank * self.world_size:self.world_size]
        self.order = [index for batch in mine for index in batch]

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)


def instance_batches(by_identity: dict[int, list[int]], p: int, k: int, rng: random.Random,
                     np_rng: np.random.RandomState) -> list[list[int]]:
    """One epoch of ``RandomIdentitySampler``: batches of ``p`` groups of ``k`` indices."""
    groups: dict[int, list[list[int]]] = {}
    for identity, pool in by_identity.items():  # insertion order: first appearance
        indices = list(pool)
        if len(indices) < k:
            indices = [int(i) for i in np_rng.choice(indices, size=k, replace=True)]
        rng.shuffle(indices)
        groups[identity] = [indices[i:i + k] for i in range(0, len(indices) - k + 1, k)]
    available = list(by_identity)
    batches = []
    while len(available) >= p:
        batch: list[int] = []
        for identity in rng.sample(available, p):
            batch += groups[identity].pop(0)
            if not groups[identity]:
                available.remove(identity)
        batches.append(batch)
    return batches
