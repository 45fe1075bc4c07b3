"""Evaluation metrics, standalone: numpy in, numbers out (no model, no torch).

``evaluate_rank`` follows torchreid's ``evaluate_rank`` protocol and signature so that figures
are comparable with the re-identification literature.
"""

from __future__ import annotations

from clipid.metrics.rank import evaluate_rank, positive_ranks, summarise
from clipid.metrics.reference import evaluate_rank_loop, k_reciprocal_rerank_loop
from clipid.metrics.rerank import k_reciprocal_rerank
from clipid.metrics.retrieval import aggregate_draws, text_to_image

__all__ = ["aggregate_draws", "evaluate_rank", "evaluate_rank_loop", "k_reciprocal_rerank",
           "k_reciprocal_rerank_loop", "positive_ranks", "summarise", "text_to_image"]
