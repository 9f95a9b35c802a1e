"""DBSCAN on a sparse distance graph, and Cluster-Contrast pseudo labels (PASS-reID:
PASS_cluster_contrast_reid/examples/cluster_contrast_train_usl.py).

The published loop runs ``sklearn.cluster.DBSCAN(eps, min_samples=4, metric="precomputed")`` on the
dense ``N x N`` Jaccard matrix. Here DBSCAN runs on the sparse graph of the entries ``<= eps``,
which is exact for ``eps < 1`` because every absent Jaccard entry is exactly 1:

* neighbours of ``i``: the stored entries of row ``i`` with distance ``<= eps`` (sklearn's rule), plus
  ``i`` itself (distance 0, whether stored or not); absent entries are never neighbours;
* core points have at least ``min_samples`` neighbours (self included);
* clusters are the connected components of the core points under the neighbour relation; they are
  numbered in the order of their lowest-index core point;
* a non-core point that is the neighbour of a core point joins the cluster with the lowest number
  among those core points; every other point is an outlier, ``-1``.

This reproduces sklearn's labels exactly for a symmetric graph (sklearn expands clusters from the
lowest-index unlabelled core point, so a border point goes to the first cluster, in that order,
that reaches it). The graph must be symmetric, as the Jaccard distance is.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from passreid.cluster.jaccard import check_k_parameters, jaccard_sparse, prepare_unit_features
from passreid.cluster.knn import Backend
from passreid.feature_inputs import EvaluationInputError

__all__ = ["NoClustersError", "dbscan_from_graph", "dbscan_pseudo_labels"]


class NoClustersError(RuntimeError):
    """DBSCAN found no cluster: every image is an outlier, so there is nothing to train on. A problem with
    the run's input (weak or collapsed weights, ``cluster.eps`` too small); the message says what to check."""


def dbscan_from_graph(graph: sp.spmatrix, eps: float, min_samples: int = 4) -> np.ndarray:
    """DBSCAN labels (int64, ``-1`` = outlier) from a sparse symmetric distance graph.

    Only stored entries count (explicit zeros included); see the module docstring for the rules.
    """
    _check_dbscan_parameters(eps, min_samples)
    if graph.ndim != 2 or graph.shape[0] != graph.shape[1]:
        raise EvaluationInputError(f"graph must be a square sparse matrix, got shape {graph.shape}")
    num_points = graph.shape[0]
    coo = sp.coo_matrix(graph)
    near = (coo.data <= eps) & (coo.row != coo.col)
    rows, cols = coo.row[near].astype(np.int64), coo.col[near].astype(np.int64)
    is_core = np.bincount(rows, minlength=num_points) + 1 >= min_samples

    labels = np.full(num_points, -1, dtype=np.int64)
    core_edge = is_core[rows] & is_core[cols]
    core_graph = sp.coo_matrix((np.ones(int(core_edge.sum()), dtype=np.int8), (rows[core_edge], cols[core_edge])),
                               shape=(num_points, num_points))
    _, component = connected_components(core_graph, directed=False)
    core_ids = np.flatnonzero(is_core)
    # Number the clusters by their lowest-index core point (core_ids is ascending).
    _, first_seen, dense_component = np.unique(component[core_ids], return_index=True, return_inverse=True)
    rank_of_component = np.empty(len(first_seen), dtype=np.int64)
    rank_of_component[np.argsort(first_seen)] = np.arange(len(first_seen))
    labels[core_ids] = rank_of_component[dense_component]

    border_edge = is_core[rows] & ~is_core[cols]
    if border_edge.any():
        best = np.full(num_points, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(best, cols[border_edge], labels[rows[border_edge]])
        reached = best != np.iinfo(np.int64).max
        labels[reached] = best[reached]
    return labels


def dbscan_pseudo_labels(
    feats: torch.Tensor | np.ndarray,
    eps: float = 0.6,
    min_samples: int = 4,
    k1: int = 30,
    k2: int = 6,
    *,
    normalize: bool = True,
    require_unit: bool = True,
    backend: Backend = "auto",
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Cluster-Contrast pseudo labels: DBSCAN on the k-reciprocal Jaccard distance of ``feats``.

    Returns int64 labels ``0..K-1`` per row, ``-1`` for outliers. Equals
    ``DBSCAN(eps, min_samples, metric="precomputed").fit_predict(dense_jaccard)`` without building
    the dense matrix. ``eps >= 1`` makes every pair neighbours (all Jaccard distances are <= 1):
    one cluster, or all outliers when there are fewer than ``min_samples`` points. ``normalize`` and
    ``require_unit``: how the rows enter the Jaccard distance (:func:`passreid.cluster.jaccard_sparse`).
    """
    _check_dbscan_parameters(eps, min_samples)
    check_k_parameters(k1, k2)
    if eps >= 1.0:
        num_points = prepare_unit_features(feats, normalize, require_unit).shape[0]
        return np.full(num_points, 0 if num_points >= min_samples else -1, dtype=np.int64)
    graph = jaccard_sparse(feats, k1, k2, max_distance=eps, normalize=normalize, require_unit=require_unit,
                           backend=backend, device=device)
    return dbscan_from_graph(graph, eps, min_samples)


def _check_dbscan_parameters(eps: float, min_samples: int) -> None:
    if not np.isfinite(eps) or eps <= 0:
        raise EvaluationInputError(f"eps must be a positive number, got {eps!r}")
    if isinstance(min_samples, bool) or not isinstance(min_samples, (int, np.integer)) or min_samples < 1:
        raise EvaluationInputError(f"min_samples must be a positive integer, got {min_samples!r}")
