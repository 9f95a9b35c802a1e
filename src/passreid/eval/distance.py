"""Query-chunked distances for retrieval evaluation.

Every distance here is available in two forms:

* a *chunk function* ``fn(q_start, q_end) -> Tensor (q_end - q_start, G)`` that
  :func:`passreid.eval.rank.rank_metrics_from_distance` calls one query chunk at a time, so the
  full query x gallery matrix never has to exist (memory is bounded by chunk x gallery);
* a convenience function returning the full ``(Q, G)`` matrix (the chunk function over all queries),
  for small problems, re-ranking and tests.

Distances are ascending-is-better and computed in float32 with a matmul:

* ``"euclidean"``: **squared** Euclidean distance, clamped at 0. With ``normalize=True`` (default)
  the features are L2-normalised, so it is ``2 − 2 cos``, the TransReID/PASS test distance; with
  ``normalize=False`` it is ``||q||² + ||g||² − 2 q·g`` on the raw features. Squaring is monotone,
  so the ranking (and every rank metric) equals that of the plain Euclidean distance; pass
  ``squared=False`` to :func:`pairwise_distance` for the plain distance.
* ``"cosine"``: ``1 − cos(q, g)`` (features are always normalised). For normalised features it
  ranks exactly like ``"euclidean"`` up to float rounding.

The part-based distance (:func:`visible_part_distance`) follows BPBReID's visibility-aware
distance: per-part plain Euclidean distances averaged over mutually visible parts only.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from passreid.feature_inputs import EvaluationInputError, as_feature_tensor, check_finite_features, resolve_device

__all__ = [
    "EvaluationInputError",
    "DistanceChunkFn",
    "FeatureDistance",
    "VisiblePartDistance",
    "pairwise_distance",
    "visible_part_distance",
    "as_feature_tensor",
    "resolve_device",
]

Metric = Literal["euclidean", "cosine"]
VisibilityMode = Literal["binary", "weighted"]
#: ``fn(q_start, q_end) -> (q_end - q_start, G)`` distance rows for a contiguous block of queries.
DistanceChunkFn = Callable[[int, int], torch.Tensor]

_METRICS = ("euclidean", "cosine")
_NORM_EPS = 1e-12  # same guard as torch.nn.functional.normalize: zero vectors stay zero


def _check_metric(metric: str) -> None:
    if metric not in _METRICS:
        raise EvaluationInputError(f"unknown metric {metric!r}; expected one of {_METRICS}")


class FeatureDistance:
    """Chunk function for the feature distance between ``query`` and ``gallery`` rows.

    Features are validated, converted to float32 and moved to ``device`` once (no copy when they
    already are float32 there); each call computes ``(q_end - q_start, G)`` distances with one
    matmul. Normalisation scales the query chunk and the columns of the product, so no normalised
    copy of the gallery is kept.
    """

    def __init__(
        self,
        query_feats: torch.Tensor | np.ndarray,
        gallery_feats: torch.Tensor | np.ndarray,
        *,
        metric: Metric = "euclidean",
        normalize: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        _check_metric(metric)
        query = as_feature_tensor(query_feats, "query features")
        gallery = as_feature_tensor(gallery_feats, "gallery features")
        if query.shape[1] != gallery.shape[1]:
            raise EvaluationInputError(
                f"feature dimension differs: query features have D={query.shape[1]}, "
                f"gallery features have D={gallery.shape[1]}"
            )
        self.device = resolve_device(device)
        self.metric = metric
        self.normalize = normalize or metric == "cosine"
        # Finite, bounded features give finite normalised distances: the evaluator skips its check.
        self.output_is_finite = self.normalize
        # No normalised copy of the gallery: distances are rescaled by 1/||g|| per column instead,
        # which keeps the memory at the caller's features plus one chunk.
        self.query = query.to(self.device)
        self.gallery = gallery.to(self.device)
        if self.normalize:
            self.query_scale = 1.0 / self.query.norm(dim=1).clamp_(min=_NORM_EPS)
            self.gallery_scale = 1.0 / self.gallery.norm(dim=1).clamp_(min=_NORM_EPS)
        else:
            self.query_sq = self.query.pow(2).sum(1)
            self.gallery_sq = self.gallery.pow(2).sum(1)

    @property
    def num_query(self) -> int:
        return self.query.shape[0]

    @property
    def num_gallery(self) -> int:
        return self.gallery.shape[0]

    def __call__(self, q_start: int, q_end: int) -> torch.Tensor:
        query = self.query[q_start:q_end]
        if not self.normalize:  # raw squared Euclidean ||q||² + ||g||² − 2 q·g
            dist = torch.addmm(self.gallery_sq.unsqueeze(0), query, self.gallery.t(), beta=1.0, alpha=-2.0)
            return dist.add_(self.query_sq[q_start:q_end].unsqueeze(1)).clamp_(min=0.0)
        query = query * self.query_scale[q_start:q_end].unsqueeze(1)
        dot = torch.mm(query, self.gallery.t())
        # One fused pass: cos = dot / ||g||; cosine: 1 − cos; unit-vector euclidean: 2 − 2 cos.
        offset, factor = (1.0, -1.0) if self.metric == "cosine" else (2.0, -2.0)
        dist = torch.addcmul(dot.new_tensor(offset), dot, self.gallery_scale.unsqueeze(0), value=factor, out=dot)
        # Clamp: rounding can make 2 − 2 cos slightly negative.
        return dist if self.metric == "cosine" else dist.clamp_(min=0.0)


def pairwise_distance(
    query_feats: torch.Tensor | np.ndarray,
    gallery_feats: torch.Tensor | np.ndarray,
    *,
    metric: Metric = "euclidean",
    normalize: bool = True,
    squared: bool = True,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Full ``(Q, G)`` float32 distance matrix (see the module docstring for the definitions).

    ``squared=False`` returns the plain Euclidean distance (only meaningful for ``"euclidean"``).
    Use :class:`FeatureDistance` with the rank metrics for large problems instead.
    """
    fn = FeatureDistance(query_feats, gallery_feats, metric=metric, normalize=normalize, device=device)
    dist = fn(0, fn.num_query)
    if not squared:
        if metric != "euclidean":
            raise EvaluationInputError("squared=False only applies to metric='euclidean'")
        dist = dist.sqrt_()
    return dist


class VisiblePartDistance:
    """Chunk function for BPBReID's visibility-aware part distance (bpbreid: ``torchreid/metrics/distance.py``).

    For query ``q`` and gallery ``g`` with part features ``q_k``, ``g_k`` (``K`` parts) and
    visibility scores ``v_k``::

        d_k(q, g) = ||q_k − g_k||₂                     (plain, not squared; parts L2-normalised first
                                                         when ``normalize=True``)
        d(q, g)   = Σ_k w_k d_k / Σ_k w_k               (mean over mutually visible parts)

    * ``visibility="binary"``: ``v`` is binarised as ``v >= threshold`` and ``w_k = v_k^q v_k^g``
      (1 iff the part is visible in both images), BPBReID's default.
    * ``visibility="weighted"``: ``v`` in ``[0, 1]`` is used as is and ``w_k = sqrt(v_k^q v_k^g)``,
      BPBReID's/TSD's continuous variant.

    Pairs with no mutually visible part (``Σ_k w_k = 0``) get ``no_overlap_distance``. BPBReID uses
    "maximum distance + 1" over the whole matrix, which a chunked evaluator cannot know in advance;
    instead the default is an upper bound of every possible part distance plus 1 (``2 + 1 = 3`` for
    normalised parts, ``max ||q_k|| + max ||g_k|| + 1`` otherwise). It is larger than every real
    distance, so these pairs rank last exactly as with BPBReID's rule (ties among them are broken
    by gallery index like every tie).

    ``always_visible`` lists part indices (e.g. the global or foreground embedding) whose visibility
    is forced to 1, as the published distance does (bpbreid: ``torchreid/metrics/distance.py``).
    """

    def __init__(
        self,
        query_parts: torch.Tensor | np.ndarray,
        query_visibility: torch.Tensor | np.ndarray,
        gallery_parts: torch.Tensor | np.ndarray,
        gallery_visibility: torch.Tensor | np.ndarray,
        *,
        visibility: VisibilityMode = "binary",
        threshold: float = 0.5,
        normalize: bool = True,
        always_visible: Sequence[int] = (),
        no_overlap_distance: float | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if visibility not in ("binary", "weighted"):
            raise EvaluationInputError(f"unknown visibility mode {visibility!r}; expected 'binary' or 'weighted'")
        self.device = resolve_device(device)
        q_parts = _as_part_tensor(query_parts, "query part features")
        g_parts = _as_part_tensor(gallery_parts, "gallery part features")
        if q_parts.shape[1:] != g_parts.shape[1:]:
            raise EvaluationInputError(
                f"part features differ in (K, D): query {tuple(q_parts.shape[1:])}, gallery {tuple(g_parts.shape[1:])}"
            )
        num_parts = q_parts.shape[1]
        q_vis = _as_visibility(query_visibility, q_parts.shape[:2], "query visibility")
        g_vis = _as_visibility(gallery_visibility, g_parts.shape[:2], "gallery visibility")
        for index in always_visible:
            if not -num_parts <= index < num_parts:
                raise EvaluationInputError(f"always_visible index {index} is out of range for {num_parts} parts")
            q_vis[:, index] = 1.0
            g_vis[:, index] = 1.0
        if visibility == "binary":
            q_vis, g_vis = (q_vis >= threshold).float(), (g_vis >= threshold).float()
        elif bool((q_vis > 1).any() or (g_vis > 1).any()):
            raise EvaluationInputError("weighted visibility scores must lie in [0, 1]")

        q_parts, g_parts = q_parts.to(self.device), g_parts.to(self.device)
        if normalize:
            q_parts, g_parts = F.normalize(q_parts, dim=2), F.normalize(g_parts, dim=2)
            bound = 2.0
        else:
            bound = float(q_parts.norm(dim=2).max() + g_parts.norm(dim=2).max())
        self.no_overlap_distance = bound + 1.0 if no_overlap_distance is None else float(no_overlap_distance)
        # Normalised parts give bounded distances: the evaluator can skip its finiteness check.
        self.output_is_finite = normalize and math.isfinite(self.no_overlap_distance)
        self.visibility = visibility
        # Part-major layout so each part's chunk distance is one contiguous matmul.
        self.query_parts = q_parts.transpose(0, 1).contiguous()  # (K, Q, D)
        self.gallery_parts_t = g_parts.permute(1, 2, 0).contiguous()  # (K, D, G)
        self.query_sq = self.query_parts.pow(2).sum(2)  # (K, Q)
        self.gallery_sq = self.gallery_parts_t.pow(2).sum(1)  # (K, G)
        self.query_vis = q_vis.t().contiguous().to(self.device)  # (K, Q)
        self.gallery_vis = g_vis.t().contiguous().to(self.device)  # (K, G)

    @property
    def num_query(self) -> int:
        return self.query_parts.shape[1]

    @property
    def num_gallery(self) -> int:
        return self.gallery_parts_t.shape[2]

    def __call__(self, q_start: int, q_end: int) -> torch.Tensor:
        num_rows = q_end - q_start
        weighted_sum = torch.zeros(num_rows, self.num_gallery, device=self.device)
        weight_total = torch.zeros_like(weighted_sum)
        for k in range(self.query_parts.shape[0]):  # loop over the few parts, never over queries
            part_dist = torch.addmm(
                self.gallery_sq[k].unsqueeze(0), self.query_parts[k, q_start:q_end], self.gallery_parts_t[k],
                beta=1.0, alpha=-2.0,
            )
            part_dist.add_(self.query_sq[k, q_start:q_end].unsqueeze(1)).clamp_(min=0.0).sqrt_()
            weight = torch.outer(self.query_vis[k, q_start:q_end], self.gallery_vis[k])
            if self.visibility == "weighted":
                weight.sqrt_()
            weighted_sum.addcmul_(weight, part_dist)
            weight_total.add_(weight)
        no_overlap = weight_total <= 0
        dist = weighted_sum.div_(weight_total.clamp_(min=torch.finfo(torch.float32).tiny))
        return dist.masked_fill_(no_overlap, self.no_overlap_distance)


def visible_part_distance(
    query_parts: torch.Tensor | np.ndarray,
    query_visibility: torch.Tensor | np.ndarray,
    gallery_parts: torch.Tensor | np.ndarray,
    gallery_visibility: torch.Tensor | np.ndarray,
    **options,
) -> torch.Tensor:
    """Full ``(Q, G)`` visibility-aware part distance; see :class:`VisiblePartDistance` for the
    definition and ``options``. Parts are ``(N, K, D)``, visibility scores ``(N, K)``."""
    fn = VisiblePartDistance(query_parts, query_visibility, gallery_parts, gallery_visibility, **options)
    return fn(0, fn.num_query)


def _as_part_tensor(parts: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(parts)
    if tensor.dim() != 3:
        raise EvaluationInputError(f"{name}: expected an (N, K, D) array, got shape {tuple(tensor.shape)}")
    num, num_parts, dim = tensor.shape
    return as_feature_tensor(tensor.reshape(num, num_parts * dim), name).reshape(num, num_parts, dim)


def _as_visibility(vis: torch.Tensor | np.ndarray, shape: torch.Size, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(vis)
    if tuple(tensor.shape) != tuple(shape):
        raise EvaluationInputError(f"{name}: expected shape {tuple(shape)} (N, K), got {tuple(tensor.shape)}")
    tensor = tensor.float().clone()
    check_finite_features(tensor, name)
    if bool((tensor < 0).any()):
        raise EvaluationInputError(f"{name}: visibility scores must be >= 0")
    return tensor
