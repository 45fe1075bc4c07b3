"""Evaluation metrics, standalone: numpy in, numbers out (no model, no torch).

``evaluate_rank`` follows torchreid's ``evaluate_rank`` protocol and signature so that figures
are comparable with the re-identification literature; ``rank_metrics`` adds mINP from the same
pass, ``verification`` the pairwise TPR at FPR and EER, ``average_query_expansion`` the "+AQE".
"""

from __future__ import annotations

from clipid.metrics.expansion import average_query_expansion
from clipid.metrics.rank import RankMetrics, evaluate_rank, positive_ranks, rank_metrics, summarise
from clipid.metrics.reference import (
    average_query_expansion_loop,
    evaluate_rank_loop,
    k_reciprocal_rerank_loop,
    rank_metrics_loop,
    verification_loop,
)
from clipid.metrics.rerank import k_reciprocal_rerank
from clipid.metrics.retrieval import aggregate_draws, text_to_image
from clipid.metrics.verification import REPORTED_FPRS, ROC_GRID, Verification, verification

__all__ = ["REPORTED_FPRS", "ROC_GRID", "RankMetrics", "Verification", "aggregate_draws",
           "average_query_expansion", "average_query_expansion_loop", "evaluate_rank",
           "evaluate_rank_loop", "k_reciprocal_rerank", "k_reciprocal_rerank_loop",
           "positive_ranks", "rank_metrics", "rank_metrics_loop", "summarise", "text_to_image",
           "verification", "verification_loop"]
