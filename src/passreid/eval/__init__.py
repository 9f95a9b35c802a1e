"""Retrieval evaluation: chunked distances, exact CMC/mAP/mINP and (lazily) k-reciprocal re-ranking.

``re_ranking`` lives in :mod:`passreid.eval.rerank`; ``from passreid.eval import re_ranking`` imports
it on first access, so this package does not depend on it at import time (it is left out of
``__all__`` so that a star import never triggers that import).
"""
from __future__ import annotations

from typing import Any

from passreid.eval.distance import (
    DistanceChunkFn,
    EvaluationInputError,
    FeatureDistance,
    VisiblePartDistance,
    pairwise_distance,
    visible_part_distance,
)
from passreid.eval.rank import (
    DEFAULT_MEMORY_BUDGET_MB,
    RankResult,
    default_chunk_size,
    rank_metrics,
    rank_metrics_from_distance,
)

__all__ = [
    "DEFAULT_MEMORY_BUDGET_MB",
    "DistanceChunkFn",
    "EvaluationInputError",
    "FeatureDistance",
    "RankResult",
    "VisiblePartDistance",
    "default_chunk_size",
    "pairwise_distance",
    "rank_metrics",
    "rank_metrics_from_distance",
    "visible_part_distance",
]


def __getattr__(name: str) -> Any:
    # Lazy so that importing passreid.eval neither requires nor circularly imports the re-ranking module.
    if name == "re_ranking":
        from passreid.eval.rerank import re_ranking

        return re_ranking
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
