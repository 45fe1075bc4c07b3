"""IVF-PQ built from embedding shards: the same index however the gallery is cut, memory
bounded by a shard, parameters from params.yaml."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import faiss
import numpy as np
import pytest

from clipid.config import FaissParams, params_from_dict
from clipid.errors import ClipidError
from clipid.search.index import ExactIndex, IVFPQIndex, build_index, neighbour_recall
from clipid.search.shards import ShardWriter, iter_shards, sample_rows, shard_rows

PARAMS = FaissParams(type="ivfpq", nlist=16, nprobe=16, train_size=3000, pq_m=16, pq_nbits=8)


def gallery(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Unit vectors around 40 centres: clustered, as embeddings of identities are."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim))
    x = centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write(vectors: np.ndarray, directory: Path, rows: int, blocks: int = 333) -> list[Path]:
    writer = ShardWriter(directory, rows)
    for start in range(0, len(vectors), blocks):  # appended in blocks of another size
        writer.append(vectors[start:start + blocks])
    return writer.close()


def test_shards_keep_the_gallery_order_and_a_rewrite_leaves_no_stale_shard(tmp_path):
    vectors = gallery(2500)
    files = write(vectors, tmp_path, 700)
    assert [f.name for f in files] == [f"embeddings-0000{i}.npy" for i in range(4)]
    assert shard_rows(tmp_path) == [700, 700, 700, 400]
    assert np.array_equal(np.concatenate(list(iter_shards(tmp_path))), vectors)
    write(vectors[:800], tmp_path, 700)
    assert shard_rows(tmp_path) == [700, 100]


def test_the_training_sample_does_not_depend_on_the_shard_size(tmp_path):
    vectors = gallery(2500)
    write(vectors, tmp_path / "one", 2500)
    write(vectors, tmp_path / "many", 300)
    a, b = sample_rows(tmp_path / "one", 1000, seed=3), sample_rows(tmp_path / "many", 1000, 3)
    assert a.shape == (1000, 32) and np.array_equal(a, b)


def test_a_sharded_gallery_builds_the_index_of_one_shard(tmp_path):
    vectors = gallery(5000)
    write(vectors, tmp_path / "one", len(vectors))
    write(vectors, tmp_path / "many", 700)
    whole = IVFPQIndex.build_from_shards(tmp_path / "one", PARAMS, seed=0)
    cut = IVFPQIndex.build_from_shards(tmp_path / "many", PARAMS, seed=0)
    assert len(whole) == len(cut) == 5000
    assert bytes(faiss.serialize_index(whole.index)) == bytes(faiss.serialize_index(cut.index))
    queries = vectors[::50]
    s1, i1 = whole.search(queries, 10)
    s2, i2 = cut.search(queries, 10)
    assert np.array_equal(i1, i2) and np.array_equal(s1, s2)
    _, truth = ExactIndex(vectors).search(queries, 10)
    assert neighbour_recall(truth, i1) > 0.5  # approximate, but far above chance (0.002)


def test_building_holds_one_shard_not_the_gallery(tmp_path):
    vectors = gallery(20_000)
    write(vectors, tmp_path, 2000)
    full = vectors.nbytes
    del vectors
    params = FaissParams(type="ivfpq", nlist=32, train_size=2000, pq_m=8, pq_nbits=6)
    tracemalloc.start()
    IVFPQIndex.build_from_shards(tmp_path, params, seed=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.4 * full, f"peak {peak} bytes for a {full}-byte gallery"


def test_ivfpq_through_build_index_and_its_params(tmp_path):
    params = params_from_dict({"search": {"backend": "faiss", "faiss": {
        "type": "ivfpq", "pq_m": 8, "pq_nbits": 6, "nlist": 8}}}).search.faiss
    vectors = gallery(1000)
    index = build_index(vectors, "faiss", params)
    assert isinstance(index, IVFPQIndex) and len(index) == 1000
    index.save(tmp_path / "faiss.index")
    loaded = IVFPQIndex.load(tmp_path / "faiss.index", params)
    assert np.array_equal(loaded.search(vectors[:5], 3)[1], index.search(vectors[:5], 3)[1])
    with pytest.raises(ClipidError, match="pq_m: 5 does not divide the embedding dimension 32"):
        build_index(vectors, "faiss", FaissParams(type="ivfpq", pq_m=5))
