"""PK and sharded samplers: batch composition, determinism, disjoint shards."""

from __future__ import annotations

from collections import Counter

import pytest

from clipid.errors import ClipidError
from clipid.training.samplers import PKSampler, ShardedRandomSampler

# 10 identities: identity i has i + 1 images (so identities 0..2 have fewer than k = 4).
LABELS = [i for i in range(10) for _ in range(i + 1)]


def batches(sampler, size):
    order = list(sampler)
    assert len(order) == len(sampler)
    return [order[b:b + size] for b in range(0, len(order), size)]


def test_pk_batches_hold_p_identities_with_k_images_each():
    sampler = PKSampler(LABELS, p=3, k=4, seed=0)
    chunks = batches(sampler, 12)
    assert len(chunks) == 10 // 3
    for batch in chunks:
        counts = Counter(LABELS[i] for i in batch)
        assert len(counts) == 3 and set(counts.values()) == {4}
        for identity in counts:
            picked = [i for i in batch if LABELS[i] == identity]
            if identity + 1 >= 4:  # enough images: no repeats within the batch
                assert len(set(picked)) == 4
            else:  # too few: sampled with replacement, from that identity only
                assert set(picked) <= {j for j, lab in enumerate(LABELS) if lab == identity}
    seen = {LABELS[i] for batch in chunks for i in batch}
    assert len(seen) == 9  # an identity appears at most once per epoch; the 10th is left over


def test_pk_is_deterministic_per_seed_and_epoch():
    a, b = PKSampler(LABELS, 2, 2, seed=3), PKSampler(LABELS, 2, 2, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(PKSampler(LABELS, 2, 2, seed=4)) != first


def test_pk_shards_are_disjoint_whole_batches_of_equal_length():
    whole = batches(PKSampler(LABELS, 2, 2, seed=0, world_size=1), 4)
    shards = [PKSampler(LABELS, 2, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2 * 4
    rank_batches = [batches(s, 4) for s in shards]
    # Batch b of the global order goes to rank b % 2.
    assert rank_batches[0] == whole[0:4:2] and rank_batches[1] == whole[1:4:2]
    # Whole batches of distinct identities: the ranks share no identity, hence no image.
    ids = [{LABELS[i] for i in s} for s in shards]
    assert not ids[0] & ids[1]


def test_pk_errors_are_clear():
    # A user's error (params against data): the CLI prints it in one line, no traceback.
    with pytest.raises(ClipidError, match="10 identities cannot fill"):
        PKSampler(LABELS, p=6, k=2, world_size=2)
    with pytest.raises(ValueError, match="at least 1"):
        PKSampler(LABELS, p=0, k=2)
    with pytest.raises(ValueError, match="at least 1"):
        PKSampler(LABELS, p=2, k=0)
    with pytest.raises(ValueError, match="rank 2"):
        PKSampler(LABELS, p=2, k=2, rank=2, world_size=2)


def test_pk_epochs_and_seeds_do_not_collide():
    # seed + epoch would make these equal.
    a = PKSampler(LABELS, 2, 2, seed=0)
    a.set_epoch(1)
    assert list(a) != list(PKSampler(LABELS, 2, 2, seed=1))


def test_sharded_random_covers_everything_once_per_epoch():
    sampler = ShardedRandomSampler(10, seed=1)
    assert sorted(sampler) == list(range(10))
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(10))


def test_sharded_random_ranks_are_padded_to_equal_length():
    shards = [list(ShardedRandomSampler(11, seed=0, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    everything = [i for s in shards for i in s]
    assert set(everything) == set(range(11)) and len(everything) == 12  # one index repeated


def test_sharded_random_is_deterministic_and_validates():
    a, b = ShardedRandomSampler(7, seed=5, rank=1, world_size=2), ShardedRandomSampler(
        7, seed=5, rank=1, world_size=2)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and len(a) == len(list(a)) == 4
    with pytest.raises(ValueError, match="no samples"):
        ShardedRandomSampler(0)
    with pytest.raises(ValueError, match="rank -1"):
        ShardedRandomSampler(5, rank=-1, world_size=2)
