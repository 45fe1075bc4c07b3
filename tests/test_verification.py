"""Verification rates (TPR at FPR, EER) and average query expansion against the plain loop
transcriptions of their published definitions, on random clustered cases."""

from __future__ import annotations

import numpy as np
import pytest

from clipid.metrics import (
    average_query_expansion,
    average_query_expansion_loop,
    verification,
    verification_loop,
)
from clipid.metrics.verification import ROC_GRID, fpr_name
from test_metrics import clustered_case

FPRS = (0.0, 1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5, 1.0)


@pytest.mark.parametrize("seed", range(30))
def test_verification_equals_the_pairwise_loop_on_clustered_cases(seed):
    distmat, q_ids, g_ids, cams = clustered_case(seed, ties=seed % 2 == 0, cameras=seed % 3 > 0)
    if seed % 5 == 4:  # float64 keys: four passes; negative distances: the sign folded in
        distmat = distmat.astype(np.float64) - 0.5
    expected_tpr, expected_eer = verification_loop(distmat, q_ids, g_ids, *cams, fprs=FPRS)
    result = verification(distmat, q_ids, g_ids, *cams, fprs=FPRS)
    assert result.tpr == expected_tpr
    assert result.eer == pytest.approx(expected_eer, abs=1e-12)


def test_hand_computed_rates_and_same_camera_pairs_left_out():
    # Query "a" (camera 0) against g0 "a" cam 0 (left out), g1 "a" cam 1 at 0.4, g2 "b" at 0.1,
    # g3 "b" at 0.5, g4 "c" at 0.4 (tied with the positive).
    distmat = np.array([[0.0, 0.4, 0.1, 0.5, 0.4]], dtype=np.float32)
    q_ids, g_ids = np.array(["a"]), np.array(["a", "a", "b", "b", "c"])
    q_cams, g_cams = np.array([0]), np.array([0, 1, 0, 0, 0])
    result = verification(distmat, q_ids, g_ids, q_cams, g_cams, fprs=(0.0, 0.25, 0.5, 1.0))
    assert (result.positives, result.negatives) == (1, 3)
    # ROC points: (0, 0); 0.1: (1/3, 0); 0.4: (2/3, 1); 0.5: (1, 1).
    assert result.tpr == {0.0: 0.0, 0.25: 0.0, 0.5: 0.0, 1.0: 1.0}
    # FNR - FPR: 2/3 at (1/3, 0), -2/3 at (2/3, 1): the segment crosses half way, FPR 1/2.
    assert result.eer == pytest.approx(0.5)
    # Without cameras g0 is a positive at distance 0: accepted before any negative.
    plain = verification(distmat, q_ids, g_ids, fprs=(0.0,))
    assert plain.tpr == {0.0: 0.5} and plain.positives == 2


def test_separable_pairs_have_full_tpr_and_zero_eer():
    q_ids, g_ids = np.arange(4), np.tile(np.arange(4), 3)
    distmat = np.where(q_ids[:, None] == g_ids[None], 0.1, 0.9)
    result = verification(distmat, q_ids, g_ids)
    assert result.tpr == {1e-4: 1.0, 1e-3: 1.0, 1e-2: 1.0} and result.eer == 0.0
    assert result.summary() == {"TPR_at_FPR_1e-4": 1.0, "TPR_at_FPR_1e-3": 1.0,
                                "TPR_at_FPR_1e-2": 1.0, "EER": 0.0}


def test_order_of_queries_and_gallery_does_not_matter():
    distmat, q_ids, g_ids, (q_cams, g_cams) = clustered_case(3, ties=True, cameras=True)
    rng = np.random.default_rng(0)
    rows, cols = rng.permutation(len(q_ids)), rng.permutation(len(g_ids))
    a = verification(distmat, q_ids, g_ids, q_cams, g_cams, fprs=ROC_GRID)
    b = verification(distmat[rows][:, cols], q_ids[rows], g_ids[cols], q_cams[rows],
                     g_cams[cols], fprs=ROC_GRID)
    assert a == b


def test_small_blocks_give_the_same_rates():
    distmat, q_ids, g_ids, cams = clustered_case(7, ties=True, cameras=True)
    whole = verification(distmat, q_ids, g_ids, *cams, fprs=FPRS)
    assert verification(distmat, q_ids, g_ids, *cams, fprs=FPRS, block_elements=7) == whole


def test_verification_rejects_what_has_no_rates():
    with pytest.raises(ValueError, match="positive and negative pairs"):
        verification(np.zeros((2, 2)), np.array([0, 1]), np.array([2, 3]))
    with pytest.raises(ValueError, match="NaN"):
        verification(np.full((1, 2), np.nan), np.array([0]), np.array([0, 1]))
    assert fpr_name(1e-4) == "TPR_at_FPR_1e-4" and fpr_name(0.01) == "TPR_at_FPR_1e-2"


def _features(seed: int, ties: bool):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, 16))
    ids = rng.integers(0, 6, 40)
    x = centres[ids] + 0.7 * rng.standard_normal((40, 16))
    if ties:  # duplicated images: equal similarities at the k-th neighbour
        x = np.concatenate([x, x[:8]])
    return x[:10], x[10:]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(("k", "alpha"), [(1, 3.0), (5, 3.0), (10, 1.0), (100, 2.0)])
def test_query_expansion_equals_the_loop_transcription(seed, k, alpha):
    q, g = _features(seed, ties=seed % 2 == 0)
    if seed % 4 == 1:
        q, g = q.astype(np.float32), g.astype(np.float32)
    fast = average_query_expansion(q, g, k=k, alpha=alpha, block_elements=97)
    loop = average_query_expansion_loop(q, g, k=k, alpha=alpha)
    for a, b in zip(fast, loop, strict=True):
        assert a.dtype == b.dtype == q.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5 if q.dtype == np.float32 else 1e-12,
                                   atol=1e-6 if q.dtype == np.float32 else 1e-12)


def test_query_expansion_by_hand_and_bad_input():
    # Three images on a line: with k = 2 each averages itself and its nearest, weights cos^1.
    q = np.array([[1.0, 0.0]])
    g = np.array([[1.0, 1.0], [0.0, 1.0]])
    eq, eg = average_query_expansion(q, g, k=2, alpha=1.0)
    c = 1 / np.sqrt(2)
    np.testing.assert_allclose(eq[0], (q[0] * 1 + g[0] * c) / 2)
    np.testing.assert_allclose(eg[0], (g[0] * 1 + q[0] * c) / 2)  # tie: the query comes first
    with pytest.raises(ValueError, match="negative similarity"):
        average_query_expansion(np.array([[1.0, 0.0]]), np.array([[-1.0, 0.1]]), k=2, alpha=0.5)
    with pytest.raises(ValueError, match="k >= 1"):
        average_query_expansion(q, g, k=0)


def test_query_expansion_improves_map_on_clustered_data():
    from clipid.metrics import evaluate_rank

    gains = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((12, 16))
        ids = np.repeat(np.arange(12), 5)
        x = centres[ids] + 0.9 * rng.standard_normal((60, 16))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        query = np.arange(60) % 5 == 0
        q, g = x[query], x[~query]
        _, before = evaluate_rank(1 - q @ g.T, ids[query], ids[~query])
        eq, eg = average_query_expansion(q, g, k=3)
        eq /= np.linalg.norm(eq, axis=1, keepdims=True)
        eg /= np.linalg.norm(eg, axis=1, keepdims=True)
        _, after = evaluate_rank(1 - eq @ eg.T, ids[query], ids[~query])
        gains.append(after - before)
    assert np.mean(gains) > 0, gains
