"""clipid.metrics against hand-computed cases and the plain loop implementation."""

from __future__ import annotations

import numpy as np
import pytest

from clipid.metrics import (
    aggregate_draws,
    evaluate_rank,
    evaluate_rank_loop,
    k_reciprocal_rerank,
    k_reciprocal_rerank_loop,
    rank_metrics,
    rank_metrics_loop,
    summarise,
    text_to_image,
)


def test_hand_computed_cmc_and_ap():
    # Query 0 (id 1): gallery by distance: g2 (id 2), g0 (id 1), g3 (id 3), g1 (id 1), g4 (id 2)
    #   positives at ranks 2 and 4: AP = (1/2 + 2/4) / 2 = 0.5, first hit at rank 2.
    # Query 1 (id 2): ranked g4 (id 2), g1, g0, g3, g2 (id 2): positives at ranks 1 and 5:
    #   AP = (1/1 + 2/5) / 2 = 0.7, first hit at rank 1.
    distmat = np.array([[0.2, 0.4, 0.1, 0.3, 0.5],
                        [0.3, 0.2, 0.9, 0.4, 0.1]])
    q_ids, g_ids = np.array([1, 2]), np.array([1, 1, 2, 3, 2])
    cmc, mean_ap = evaluate_rank(distmat, q_ids, g_ids, max_rank=5)
    np.testing.assert_allclose(cmc, [0.5, 1, 1, 1, 1])
    assert mean_ap == pytest.approx((0.5 + 0.7) / 2)
    assert summarise(cmc, mean_ap) == pytest.approx(
        {"R1": 0.5, "R5": 1.0, "R10": 1.0, "R20": 1.0, "mAP": 0.6})


def test_hand_computed_minp():
    # The first test's case: query 0's positives at ranks 2 and 4 (INP 2/4), query 1's at
    # ranks 1 and 5 (INP 2/5). With cameras, query 0's g0 (same camera) is removed: its one
    # positive left, g1, moves to rank 3 (INP 1/3).
    distmat = np.array([[0.2, 0.4, 0.1, 0.3, 0.5],
                        [0.3, 0.2, 0.9, 0.4, 0.1]])
    q_ids, g_ids = np.array([1, 2]), np.array([1, 1, 2, 3, 2])
    result = rank_metrics(distmat, q_ids, g_ids, max_rank=5)
    assert result.mINP == pytest.approx((2 / 4 + 2 / 5) / 2)
    assert result.queries == 2 and result.mAP == pytest.approx(0.6)
    cams = rank_metrics(distmat, q_ids, g_ids, np.array([0, 0]), np.array([0, 1, 1, 1, 1]))
    assert cams.mINP == pytest.approx((1 / 3 + 2 / 5) / 2)
    assert summarise(result.cmc, result.mAP, (1,), minp=result.mINP) == pytest.approx(
        {"R1": 0.5, "mAP": 0.6, "mINP": 0.45})


def clustered_case(seed: int, ties: bool, cameras: bool, strangers: int = 3):
    """Distances of clustered embeddings: a few images per identity, ``strangers`` queries of
    identities the gallery lacks (no positive), optionally rounded to a few values (ties) and
    with cameras (some positives removed with their camera)."""
    rng = np.random.default_rng(seed)
    n_ids, dim = int(rng.integers(3, 10)), 8
    centres = rng.standard_normal((n_ids + strangers, dim))
    g_ids = rng.integers(0, n_ids, int(rng.integers(5, 60)))
    q_ids = np.concatenate([rng.integers(0, n_ids, int(rng.integers(1, 20))),
                            n_ids + np.arange(strangers)])

    def embed(ids):
        x = centres[ids] + 0.8 * rng.standard_normal((len(ids), dim))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    distmat = 1.0 - embed(q_ids) @ embed(g_ids).T
    if ties:
        distmat = np.round(distmat, 1).astype(np.float32)
    cams = (rng.integers(0, 3, len(q_ids)), rng.integers(0, 3, len(g_ids))) if cameras \
        else (None, None)
    return distmat, q_ids, g_ids, cams


@pytest.mark.parametrize("seed", range(24))
def test_minp_equals_the_loop_transcription_on_clustered_cases(seed):
    distmat, q_ids, g_ids, cams = clustered_case(seed, ties=seed % 2 == 0, cameras=seed % 3 > 0)
    expected = rank_metrics_loop(distmat, q_ids, g_ids, *cams, max_rank=20)
    result = rank_metrics(distmat, q_ids, g_ids, *cams, max_rank=20)
    np.testing.assert_array_equal(result.cmc, expected[0])
    assert result.mAP == pytest.approx(expected[1], abs=1e-12)
    assert result.mINP == pytest.approx(expected[2], abs=1e-12)
    assert 0 < result.mINP <= 1


def test_query_without_positive_is_skipped_and_all_skipped_is_an_error():
    distmat = np.array([[0.1, 0.2], [0.2, 0.1]])
    cmc, mean_ap = evaluate_rank(distmat, np.array([7, 1]), np.array([1, 2]))
    np.testing.assert_allclose(cmc, [0.0, 1.0])  # only query 1 counts: its positive is 2nd
    assert mean_ap == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no query has a positive"):
        evaluate_rank(distmat, np.array([7, 8]), np.array([1, 2]))


def test_same_identity_same_camera_entries_are_removed():
    # g0: same id, same camera (junk, removed); g1: other id, same camera (kept);
    # g2: same id, other camera (the positive).
    distmat = np.array([[0.1, 0.2, 0.3]])
    ids_q, ids_g = np.array(["a"]), np.array(["a", "b", "a"])
    cmc, mean_ap = evaluate_rank(distmat, ids_q, ids_g, np.array([0]), np.array([0, 0, 1]))
    np.testing.assert_allclose(cmc, [0.0, 1.0, 1.0])
    assert mean_ap == pytest.approx(0.5)
    # Without cameras the same-camera match counts.
    cmc, mean_ap = evaluate_rank(distmat, ids_q, ids_g)
    assert cmc[0] == 1.0 and mean_ap == pytest.approx((1 + 2 / 3) / 2)


def test_ties_are_broken_by_gallery_order():
    distmat = np.array([[0.5, 0.5, 0.5]])
    # Positive last among equals: rank 3; positive first: rank 1.
    cmc, mean_ap = evaluate_rank(distmat, np.array([1]), np.array([0, 0, 1]))
    np.testing.assert_allclose(cmc, [0, 0, 1])
    assert mean_ap == pytest.approx(1 / 3)
    cmc, mean_ap = evaluate_rank(distmat, np.array([1]), np.array([1, 0, 0]))
    np.testing.assert_allclose(cmc, [1, 1, 1])


def test_max_rank_is_clamped_to_the_gallery():
    cmc, _ = evaluate_rank(np.array([[0.3, 0.1]]), np.array([0]), np.array([0, 1]), max_rank=50)
    assert cmc.shape == (2,)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="2 x 3 but there are 1 query"):
        evaluate_rank(np.zeros((2, 3)), np.array([0]), np.array([0, 1, 2]))


@pytest.mark.parametrize("seed", range(40))
def test_equal_to_the_loop_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    n_q, n_g = rng.integers(1, 30), rng.integers(2, 80)
    # Few distinct values: many ties. String ids: the code path real data takes.
    distmat = rng.integers(0, 6, (n_q, n_g)).astype(np.float32) if seed % 2 else \
        rng.random((n_q, n_g))
    names = np.array([f"id{i:03d}" for i in range(8)])
    q_ids, g_ids = names[rng.integers(0, 8, n_q)], names[rng.integers(0, 8, n_g)]
    cams = (rng.integers(0, 3, n_q), rng.integers(0, 3, n_g)) if seed % 3 else (None, None)
    try:
        expected = evaluate_rank_loop(distmat, q_ids, g_ids, *cams, max_rank=10)
    except ValueError:
        with pytest.raises(ValueError):
            evaluate_rank(distmat, q_ids, g_ids, *cams, max_rank=10)
        return
    cmc, mean_ap = evaluate_rank(distmat, q_ids, g_ids, *cams, max_rank=10,)
    np.testing.assert_array_equal(cmc, expected[0])
    assert mean_ap == pytest.approx(expected[1], abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_small_chunks_ties_and_cameras_give_the_same_ranks(seed):
    from clipid.metrics.rank import positive_ranks

    rng = np.random.default_rng(seed)
    distmat = rng.integers(0, 4, (37, 50)).astype(np.float64)
    distmat[rng.random(distmat.shape) < 0.05] = np.inf  # infinite distances tie too
    q_ids, g_ids = rng.integers(0, 5, 37), rng.integers(0, 5, 50)
    q_cams, g_cams = rng.integers(0, 2, 37), rng.integers(0, 2, 50)
    whole = list(positive_ranks(distmat, q_ids, g_ids, q_cams, g_cams))
    chunked = list(positive_ranks(distmat, q_ids, g_ids, q_cams, g_cams, chunk_elements=120))
    assert [i for i, _ in whole] == [i for i, _ in chunked]
    for (i, a), (_, b) in zip(whole, chunked, strict=True):
        np.testing.assert_array_equal(a, b)
        # The definition: a stable sort of the row, junk removed, positions of the positives.
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((g_ids[order] == q_ids[i]) & (g_cams[order] == q_cams[i]))
        np.testing.assert_array_equal(a, np.flatnonzero((g_ids[order] == q_ids[i])[keep]))


def test_float32_ties_and_camera_filter_against_the_loop():
    rng = np.random.default_rng(1)
    # Rounded float32 distances: ties across positives, negatives and removed entries.
    distmat = np.round(rng.random((200, 300)), 2).astype(np.float32)
    q_ids, g_ids = rng.integers(0, 20, 200), rng.integers(0, 20, 300)
    q_cams, g_cams = rng.integers(0, 3, 200), rng.integers(0, 3, 300)
    cmc, mean_ap = evaluate_rank(distmat, q_ids, g_ids, q_cams, g_cams)
    cmc_loop, map_loop = evaluate_rank_loop(distmat, q_ids, g_ids, q_cams, g_cams)
    np.testing.assert_array_equal(cmc, cmc_loop)
    assert mean_ap == pytest.approx(map_loop, abs=1e-12)


def test_summarise_r_at_k_is_the_share_of_queries_with_a_hit_in_the_top_k():
    # Every query sees the gallery in index order; query q's one positive is at rank
    # first_hits[q] (R@K as the In-shop protocol defines it: a hit among the K nearest).
    first_hits = [1, 3, 6, 12]
    distmat = np.tile(np.arange(30.0), (4, 1))
    g_ids = np.full(30, -1)
    g_ids[np.array(first_hits) - 1] = np.arange(4)
    cmc, mean_ap = evaluate_rank(distmat, np.arange(4), g_ids)
    out = summarise(cmc, mean_ap)
    assert list(out) == ["R1", "R5", "R10", "R20", "mAP"]
    assert out == pytest.approx({"R1": 1 / 4, "R5": 2 / 4, "R10": 3 / 4, "R20": 1.0,
                                 "mAP": np.mean([1 / r for r in first_hits])})


def test_text_to_image_ranks_by_similarity():
    similarity = np.array([[0.9, 0.1, 0.8],   # id 0: positives g0, g2 at ranks 1, 2: AP 1
                           [0.9, 0.2, 0.1]])  # id 1: positive g1 at rank 2: AP 0.5
    result = text_to_image(similarity, np.array([0, 1]), np.array([0, 1, 0]), ks=(1, 5))
    # mINP: 2 positives, the last at rank 2 (1.0); 1 positive at rank 2 (0.5).
    assert result == pytest.approx({"R1": 0.5, "R5": 1.0, "mAP": 0.75, "mINP": 0.75})


def test_text_to_image_skips_captions_without_positive_and_breaks_ties_by_order():
    similarity = np.array([[0.5, 0.5, 0.5],   # "b": positive g2 after two equal: rank 3
                           [0.9, 0.1, 0.2]])  # "z": no gallery image: skipped
    result = text_to_image(similarity, np.array(["b", "z"]), np.array(["a", "a", "b"]),
                           ks=(1, 3))
    assert result == pytest.approx({"R1": 0.0, "R3": 1.0, "mAP": 1 / 3, "mINP": 1 / 3})
    with pytest.raises(ValueError, match="no caption"):
        text_to_image(similarity, np.array(["y", "z"]), np.array(["a", "a", "b"]))


def test_aggregate_draws_single_draw_has_zero_std():
    assert aggregate_draws([{"R1": 0.25}]) == {"R1": 0.25, "R1_std": 0.0}


def test_aggregate_draws_mean_and_std():
    out = aggregate_draws([{"mAP": 0.2, "R1": 0.5}, {"mAP": 0.4, "R1": 0.5}])
    assert out == pytest.approx({"mAP": 0.3, "mAP_std": 0.1, "R1": 0.5, "R1_std": 0.0})
    with pytest.raises(ValueError):
        aggregate_draws([])


def _clusters(seed: int, n_ids: int = 12, per_id: int = 4, noise: float = 0.9, dim: int = 16):
    """Unit vectors around identity centres; every per_id-th image is a query."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, dim))
    ids = np.repeat(np.arange(n_ids), per_id)
    x = centres[ids] + noise * rng.standard_normal((len(ids), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    query = np.arange(len(ids)) % per_id == 0
    q, g = x[query], x[~query]
    return q, g, ids[query], ids[~query]


def _euclidean(a, b):
    return np.sqrt(np.maximum(2 - 2 * a @ b.T, 0))


def _distances(q, g):
    return _euclidean(q, g), _euclidean(q, q), _euclidean(g, g)


RERANK_CASES = [  # (seed, identities, images per identity, k1, k2, lambda)
    (0, 12, 4, 20, 6, 0.3),  # the paper's parameters, k1 above the images per identity
    (1, 20, 5, 6, 3, 0.3),
    (2, 30, 4, 4, 2, 0.5),
    (3, 15, 6, 8, 1, 0.3),   # no local query expansion
    (4, 25, 3, 3, 4, 0.0),   # Jaccard distance alone, k2 above k1
    (5, 40, 5, 20, 6, 0.3),
    (6, 8, 3, 1, 1, 0.3),    # round(k1 / 2) = 0: the expansion sets are the images alone
    (7, 6, 3, 50, 40, 0.3),  # k1 and k2 beyond the number of images
]


@pytest.mark.parametrize(("seed", "n_ids", "per_id", "k1", "k2", "lam"), RERANK_CASES)
def test_rerank_equals_the_loop_transcription_of_the_published_algorithm(seed, n_ids, per_id,
                                                                         k1, k2, lam):
    q, g, q_ids, g_ids = _clusters(seed, n_ids, per_id)
    dists = _distances(q, g)
    fast = k_reciprocal_rerank(*dists, k1=k1, k2=k2, lambda_value=lam)
    loop = k_reciprocal_rerank_loop(*dists, k1=k1, k2=k2, lambda_value=lam)
    assert fast.shape == loop.shape == (len(q), len(g)) and fast.dtype == np.float32
    np.testing.assert_allclose(fast, loop, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.argsort(fast, axis=1, kind="stable"),
                                  np.argsort(loop, axis=1, kind="stable"))
    cmc, mean_ap = evaluate_rank(fast, q_ids, g_ids)
    cmc_loop, map_loop = evaluate_rank(loop, q_ids, g_ids)
    np.testing.assert_array_equal(cmc, cmc_loop)
    assert mean_ap == map_loop


@pytest.mark.parametrize("seed", range(4))
def test_rerank_ties_are_ranked_in_image_order_like_the_loop(seed):
    # Duplicated images and distances rounded to 1/10: many ties, also at the k1-th neighbour.
    q, g, _, _ = _clusters(seed, n_ids=10, per_id=4, noise=1.2)
    g = np.concatenate([g, g[:6], q[:2]])
    dists = [np.round(d, 1) for d in _distances(q, g)]
    fast = k_reciprocal_rerank(*dists, k1=5, k2=3)
    loop = k_reciprocal_rerank_loop(*dists, k1=5, k2=3)
    np.testing.assert_allclose(fast, loop, rtol=0, atol=1e-6)


def test_nearest_neighbours_are_a_stable_sort_prefix_even_with_ties():
    from clipid.metrics.rerank import _nearest

    rng = np.random.default_rng(0)
    dist = rng.integers(0, 5, (50, 300)).astype(np.float32)  # every row full of ties
    dist[7] = 1.0  # a row of one value
    for m in (1, 5, 21, 300):
        np.testing.assert_array_equal(_nearest(dist, m),
                                      np.argsort(dist, axis=1, kind="stable")[:, :m])


def test_rerank_with_lambda_one_gives_the_normalised_squared_distances():
    q, g, _, _ = _clusters(0)
    qg, qq, gg = _distances(q, g)
    reranked = k_reciprocal_rerank(qg, qq, gg, k1=5, k2=3, lambda_value=1.0)
    # Column j of the full (Q+G) matrix is divided by its largest squared value.
    largest = np.max(np.block([[qq, qg], [qg.T, gg]]) ** 2, axis=0)
    np.testing.assert_allclose(reranked, qg ** 2 / largest[: len(q), None], rtol=1e-6)
    np.testing.assert_array_equal(np.argsort(reranked, axis=1), np.argsort(qg, axis=1))


def test_rerank_output_shape_and_range():
    q, g, _, _ = _clusters(1)
    jaccard = k_reciprocal_rerank(*_distances(q, g), lambda_value=0.0)
    assert jaccard.shape == (len(q), len(g))
    assert np.all((jaccard >= 0) & (jaccard <= 1 + 1e-6))


def test_rerank_rejects_bad_input():
    q, g, _, _ = _clusters(1)
    qg, qq, gg = _distances(q, g)
    with pytest.raises(ValueError, match="g_g_dist"):
        k_reciprocal_rerank(qg, qq, gg[:-1, :-1])
    with pytest.raises(ValueError, match="finite"):
        k_reciprocal_rerank(np.full_like(qg, np.nan), qq, gg)
    with pytest.raises(ValueError, match="k1 >= 1"):
        k_reciprocal_rerank(qg, qq, gg, k1=0)


def test_rerank_improves_map_on_clustered_data():
    gains = []
    for seed in range(5):
        q, g, q_ids, g_ids = _clusters(seed)
        qg, qq, gg = _distances(q, g)
        _, before = evaluate_rank(qg, q_ids, g_ids)
        _, after = evaluate_rank(k_reciprocal_rerank(qg, qq, gg, k1=6, k2=3), q_ids, g_ids)
        gains.append(after - before)
    assert np.mean(gains) > 0, gains
