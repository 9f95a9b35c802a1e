"""TSD's holistic-query Occluded-Duke benchmark: the ALL / NPO / NTP evaluation variants.

TSD: ``utils/metrics_new.py``. Every gallery image carries an
occlusion label: ``0`` holistic, ``1`` occluded by another pedestrian (non-target pedestrian, NTP), ``2``
occluded by an object (non-pedestrian occlusion, NPO), ``3`` excluded (the holistic query images themselves,
which are also in the gallery). On top of the usual same-pid-same-camera removal, the ranking of a query drops
every **same-pid** gallery item whose label is 3 or in the variant's ignore set:

* ``ALL`` ignores {0}: positives are the same-id occluded images (labels 1 and 2);
* ``NPO`` ignores {0, 1}: positives have label 2 (object occlusion);
* ``NTP`` ignores {0, 2}: positives have label 1 (pedestrian occlusion).

Items of other identities are never removed. Queries left without a positive are skipped, as usual.

Implementation: the exclusion is the same-camera rule in disguise. For the queries of one camera ``c``, every
gallery item whose label is excluded gets camera ``c``; the standard evaluator then removes exactly the
same-pid excluded items (the camera only matters for same-pid items). The queries are evaluated one camera
group at a time with :func:`~passreid.eval.rank.rank_metrics_from_distance` and the per-query results are
merged, so CMC, mAP and mINP are those of a single evaluation with the extra exclusions.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from passreid.eval.distance import DistanceChunkFn, EvaluationInputError
from passreid.eval.rank import DEFAULT_MEMORY_BUDGET_MB, RankResult, rank_metrics_from_distance

__all__ = [
    "EXCLUDED_LABEL",
    "OCCLUSION_LABELS",
    "OCCLUSION_VARIANTS",
    "occlusion_variant_metrics",
    "variant_exclusions",
]

#: Occlusion labels of TSD's ``new_gallery.txt`` (the meaning of 1 and 2 is inferred from the variant names).
OCCLUSION_LABELS = {0: "holistic", 1: "non-target pedestrian (NTP)", 2: "non-pedestrian object (NPO)",
                    3: "excluded (holistic query image)"}
EXCLUDED_LABEL = 3
#: Labels each variant ignores for same-pid gallery items (label 3 is always ignored).
OCCLUSION_VARIANTS: dict[str, tuple[int, ...]] = {"ALL": (0,), "NPO": (0, 1), "NTP": (0, 2)}

DistanceForQueries = Callable[[np.ndarray], "DistanceChunkFn | torch.Tensor | np.ndarray"]


def variant_exclusions(variant: str) -> frozenset[int]:
    """Labels whose same-pid gallery items a variant removes from the ranking (always including 3)."""
    if variant not in OCCLUSION_VARIANTS:
        raise EvaluationInputError(f"unknown occlusion variant {variant!r}; expected one of {list(OCCLUSION_VARIANTS)}")
    return frozenset(OCCLUSION_VARIANTS[variant]) | {EXCLUDED_LABEL}


def _as_int_array(values: Sequence[int] | np.ndarray | torch.Tensor, name: str, length: int | None = None) -> np.ndarray:
    array = values.cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise EvaluationInputError(f"{name}: expected a 1-D integer array, got shape {array.shape}, dtype {array.dtype}")
    if length is not None and len(array) != length:
        raise EvaluationInputError(f"{name}: expected {length} values, got {len(array)}")
    return array.astype(np.int64)


def _valid_queries(q_pids: np.ndarray, q_camids: np.ndarray, g_pids: np.ndarray, g_camids: np.ndarray,
                   kept: np.ndarray) -> np.ndarray:
    """Queries that keep at least one positive: same pid, other camera, label not excluded."""
    cameras_of: dict[int, set[int]] = {}
    for pid, camid in zip(g_pids[kept].tolist(), g_camids[kept].tolist()):
        cameras_of.setdefault(pid, set()).add(camid)
    return np.array([bool(cameras_of.get(pid, set()) - {camid}) for pid, camid in zip(q_pids.tolist(),
                                                                                      q_camids.tolist())], dtype=bool)


def occlusion_variant_metrics(
    distance_for: DistanceForQueries,
    q_pids: Sequence[int] | np.ndarray | torch.Tensor,
    g_pids: Sequence[int] | np.ndarray | torch.Tensor,
    q_camids: Sequence[int] | np.ndarray | torch.Tensor,
    g_camids: Sequence[int] | np.ndarray | torch.Tensor,
    g_labels: Sequence[int] | np.ndarray | torch.Tensor,
    variant: str,
    *,
    max_rank: int = 50,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    device: str | torch.device | None = None,
) -> RankResult:
    """CMC / mAP / mINP of one TSD variant (``"ALL"``, ``"NPO"``, ``"NTP"``; module docstring).

    ``distance_for(query_indices)`` returns the distance of those queries (in that order) to the whole gallery:
    a ``(len(query_indices), G)`` tensor/array or a chunk function over them, e.g.
    ``lambda idx: full_matrix[idx]`` or a method's test distance built on the query subset.
    ``g_labels`` are the gallery occlusion labels in {0, 1, 2, 3}.
    """
    excluded = variant_exclusions(variant)
    q_pid, q_cam = _as_int_array(q_pids, "query pids"), _as_int_array(q_camids, "query camids")
    g_pid, g_cam = _as_int_array(g_pids, "gallery pids"), _as_int_array(g_camids, "gallery camids")
    labels = _as_int_array(g_labels, "gallery occlusion labels", len(g_pid))
    if len(q_cam) != len(q_pid) or len(g_cam) != len(g_pid):
        raise EvaluationInputError("pid and camid arrays differ in length")
    unknown = sorted(set(labels.tolist()) - set(OCCLUSION_LABELS))
    if unknown:
        raise EvaluationInputError(f"gallery occlusion labels must be in {sorted(OCCLUSION_LABELS)}, got {unknown}")
    is_excluded = np.isin(labels, sorted(excluded))
    valid = _valid_queries(q_pid, q_cam, g_pid, g_cam, ~is_excluded)
    if not valid.any():
        raise EvaluationInputError(f"variant {variant}: no query has a positive left (same pid, other camera, "
                                   f"occlusion label not in {sorted(excluded)})")
    num_query, num_gallery = len(q_pid), len(g_pid)
    query_ap, query_inp = np.full(num_query, np.nan), np.full(num_query, np.nan)
    cmc_sum, num_valid, chunk_size = None, 0, 1
    for camera in np.unique(q_cam[valid]):
        index = np.flatnonzero(valid & (q_cam == camera))
        group_cameras = np.where(is_excluded, camera, g_cam)  # excluded same-pid items look same-camera
        result = rank_metrics_from_distance(distance_for(index), q_pid[index], g_pid, q_cam[index], group_cameras,
                                            max_rank=max_rank, memory_budget_mb=memory_budget_mb, device=device)
        query_ap[index], query_inp[index] = result.query_ap, result.query_inp
        weighted = result.cmc * result.num_valid_queries
        cmc_sum = weighted if cmc_sum is None else cmc_sum + weighted
        num_valid += result.num_valid_queries
        chunk_size = max(chunk_size, result.chunk_size)
    scored = ~np.isnan(query_ap)
    return RankResult(cmc=cmc_sum / num_valid, mAP=float(query_ap[scored].mean()), mINP=float(query_inp[scored].mean()),
                      num_valid_queries=num_valid, num_queries=num_query, num_gallery=num_gallery,
                      chunk_size=chunk_size, query_ap=query_ap, query_inp=query_inp)
