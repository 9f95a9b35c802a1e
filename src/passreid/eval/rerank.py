"""k-reciprocal re-ranking (Zhong et al., CVPR'17), sparse: ``O(N k)`` memory instead of ``O(N²)``.

Reproduces the published ``re_ranking(probFea, galFea, k1=20, k2=6, lambda_value=0.3)`` (PASS-reID:
PASS_transreid/utils/reranking.py; Zhong's ``re_ranking_ranklist.py``). With
``N = Q + G`` rows (queries first) and ``D`` their squared Euclidean distances:

1. The published code divides every column of ``D`` by its maximum and transposes. ``D`` is
   symmetric, so this is ``D'[i, j] = D[i, j] / max_l D[i, l]``: each **row** scaled by its own
   maximum. A positive per-row scale leaves each row's ranking unchanged, so the neighbour lists are
   the plain nearest neighbours; only the values (weights, final blend) use ``D'``. The row maxima
   come from the same chunked pass as the neighbours (:func:`passreid.cluster.knn_with_farthest`).
2. k-reciprocal sets over the top ``k1 + 1``, expansion with ``round(k1/2)`` and the 2/3 rule,
   weights ``exp(−D')`` normalised per row, local query expansion over the top ``k2``
   (:mod:`passreid.cluster.kreciprocal`).
3. ``final = (1 − λ) Jaccard + λ D'``, for query rows x gallery columns only.

Deviations, all documented choices: ``V`` is float32 (PASS stores it in float16; Zhong's code and
the maths use float32); distances are clamped at 0 (rounding can make them slightly negative); a
row whose maximum distance is 0 (every feature identical) is scaled by 1 instead of dividing 0/0.
Neighbours at exactly equal distance are ordered arbitrarily (see :mod:`passreid.cluster.knn`).

Memory: the features, ``(N, k1 + 1)`` neighbour lists, sparse encodings with a few dozen entries per
row, and the dense ``(Q, G)`` float32 result (3.8 GB for MSMT17) plus one ``chunk x G`` block.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F

from passreid.cluster.jaccard import check_k_parameters
from passreid.cluster.knn import DEFAULT_KNN_MEMORY_MB, knn_with_farthest
from passreid.cluster.kreciprocal import (
    DEFAULT_MAX_PAIRS,
    OverlapIndex,
    jaccard_from_overlap,
    k_reciprocal_encodings,
    overlap_into_dense,
    pair_dot_products,
    plan_row_chunks,
)
from passreid.eval.distance import EvaluationInputError, FeatureDistance, as_feature_tensor

__all__ = ["re_ranking"]


def re_ranking(
    query_feats: torch.Tensor | np.ndarray,
    gallery_feats: torch.Tensor | np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    normalize: bool = True,
    device: str | torch.device | None = None,
    memory_budget_mb: float = DEFAULT_KNN_MEMORY_MB,
    max_pairs: int = DEFAULT_MAX_PAIRS,
) -> torch.Tensor:
    """Re-ranked ``(Q, G)`` float32 distance (CPU tensor) between query and gallery features.

    ``normalize=True`` L2-normalises the features first (the PASS/TransReID test pipeline always
    does); ``normalize=False`` uses them as given. ``device`` runs the ``N x N`` neighbour search and
    the query-gallery distances there (CUDA when available and ``None``); the sparse steps run on
    the CPU. ``memory_budget_mb`` bounds the dense blocks of the neighbour search and of each query
    chunk of the output pass.
    """
    check_k_parameters(k1, k2)
    if isinstance(lambda_value, bool) or not isinstance(lambda_value, numbers.Real) or not 0 <= lambda_value <= 1:
        raise EvaluationInputError(f"lambda_value must be a number in [0, 1], got {lambda_value!r}")
    query = as_feature_tensor(query_feats, "query features").detach().cpu()
    gallery = as_feature_tensor(gallery_feats, "gallery features").detach().cpu()
    if query.shape[1] != gallery.shape[1]:
        raise EvaluationInputError(
            f"feature dimension differs: query features have D={query.shape[1]}, "
            f"gallery features have D={gallery.shape[1]}"
        )
    feats = torch.cat([query, gallery])
    if normalize:
        feats = F.normalize(feats, dim=1)
    num_query, num_all = query.shape[0], feats.shape[0]

    num_neighbors = min(num_all, max(k1 + 1, k2))
    _, neighbors, farthest = knn_with_farthest(feats, num_neighbors, device=device,
                                               memory_budget_mb=memory_budget_mb)
    row_scale = torch.where(farthest > 0, farthest, torch.ones_like(farthest))
    sq_norm = feats.pow(2).sum(1)

    def scaled_distance(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        dist = pair_dot_products(feats, rows, cols).mul_(-2.0).add_(sq_norm[rows]).add_(sq_norm[cols])
        return dist.clamp_(min=0.0).div_(row_scale[rows])

    encodings = k_reciprocal_encodings(neighbors, k1, k2, scaled_distance)
    overlap_index = OverlapIndex.build(encodings[:num_query], encodings[num_query:])
    original = FeatureDistance(feats[:num_query], feats[num_query:], metric="euclidean", normalize=False,
                               device=device)

    num_gallery = num_all - num_query
    out = torch.empty(num_query, num_gallery)
    max_rows = max(1, int(memory_budget_mb * 2**20) // (8 * num_gallery))
    for start, end in plan_row_chunks(overlap_index, max_pairs=max_pairs, max_rows=max_rows):
        block = out[start:end].zero_()
        overlap_into_dense(overlap_index, start, end, block)
        jaccard_from_overlap(block).mul_(1.0 - float(lambda_value))
        block.add_(original(start, end).cpu().div_(row_scale[start:end, None]), alpha=float(lambda_value))
    return out
