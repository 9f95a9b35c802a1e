"""Cluster-Contrast k-reciprocal Jaccard distance as a sparse matrix (PASS-reID: PASS_cluster_contrast_reid/clustercontrast/utils/faiss_rerank.py).

The published ``compute_jaccard_distance(features, k1=30, k2=6)`` (faiss_rerank.py) returns a dense
``N x N`` float32 matrix; this returns only the entries below 1 (or ``<= max_distance``), which is
exact: ``J = 1`` exactly between points whose encodings share no column, and a pair sharing one has
``J < 1`` up to float rounding. Faithful details (shared maths in :mod:`.kreciprocal`):

* rows are L2-normalised (``normalize=True``, the default; the published code weights with
  ``2 − 2 x_i·x_j``, which is the squared distance for unit rows). ``normalize=False`` uses the rows as
  given and checks that they are unit-norm, unless ``require_unit=False``: then rows of any norm go in
  as they are, as the published code feeds the (not unit-norm) multi-neck UDA feature;
* only ``k1`` neighbours are requested (self included), so ``F_k1`` holds ``k1`` points (not
  ``k1 + 1``) and ``F_h`` holds ``h + 1 = round(k1/2) + 1``. The published code ranks by L2 (faiss
  ``IndexFlatL2``); for unit rows that is the inner-product ranking used here (identical up to float
  rounding of norms); rows of other norms are ranked by squared L2;
* weights ``softmax(−(2 − 2 x_i·x_j))`` over the expanded set, float32 (``use_float16`` is never
  enabled in the published pipeline); local query expansion over the first ``k2`` neighbours;
* ``J = 1 − s / (2 − s)``, negatives (rounding) clipped to 0.

One addition: the diagonal is stored as an explicit 0 for every point (``J(i, i) = 0``
mathematically; rounding would give ~1e-7), so a sparse-graph DBSCAN sees every point as its own
neighbour.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from passreid.cluster.knn import Backend, knn
from passreid.cluster.kreciprocal import (
    DEFAULT_MAX_PAIRS,
    OverlapAccumulator,
    OverlapIndex,
    jaccard_from_overlap,
    k_reciprocal_encodings,
    pair_dot_products,
    plan_row_chunks,
)
from passreid.feature_inputs import EvaluationInputError, as_feature_tensor

__all__ = ["jaccard_sparse", "check_k_parameters", "prepare_unit_features"]

_UNIT_NORM_TOLERANCE = 1e-3


def jaccard_sparse(
    feats: torch.Tensor | np.ndarray,
    k1: int = 30,
    k2: int = 6,
    *,
    max_distance: float | None = None,
    normalize: bool = True,
    require_unit: bool = True,
    backend: Backend = "auto",
    device: str | torch.device | None = None,
    max_pairs: int = DEFAULT_MAX_PAIRS,
) -> sp.csr_matrix:
    """Sparse k-reciprocal Jaccard distance between the rows of ``feats`` (N, D).

    Returns an ``N x N`` float32 CSR matrix (sorted indices, symmetric) holding the entries below 1
    (when ``max_distance`` is None) or the entries ``<= max_distance`` (``0 <= max_distance < 1``);
    absent entries are distance 1 (or above ``max_distance``). The diagonal is stored as explicit
    zeros. ``normalize`` / ``require_unit``: see the module docstring. ``backend``/``device`` select the
    kNN search (:func:`passreid.cluster.knn`).
    """
    check_k_parameters(k1, k2)
    if max_distance is not None and not 0.0 <= max_distance < 1.0:
        raise EvaluationInputError(f"max_distance must be in [0, 1) or None, got {max_distance!r}")
    x = prepare_unit_features(feats, normalize, require_unit)
    num_rows = x.shape[0]
    # Unit rows: ranking by inner product is ranking by L2 (the published faiss IndexFlatL2) up to
    # the float rounding of the norms, and skips the norm correction of every score.
    metric = "inner_product" if normalize or require_unit else "sqeuclidean"
    _, neighbors = knn(x, min(k1, num_rows), backend=backend, metric=metric, device=device)

    def unit_distance(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return pair_dot_products(x, rows, cols).mul_(-2.0).add_(2.0)

    encodings = k_reciprocal_encodings(neighbors, k1, k2, unit_distance)
    return _pairwise_jaccard(encodings, max_distance, max_pairs)


def check_k_parameters(k1: int, k2: int) -> None:
    """``k1`` and ``k2`` must be positive integers."""
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise EvaluationInputError(f"{name} must be a positive integer, got {value!r}")


def prepare_unit_features(feats: torch.Tensor | np.ndarray, normalize: bool, require_unit: bool = True) -> torch.Tensor:
    """Validated float32 CPU features, L2-normalised (``normalize``), checked to be unit-norm
    (``require_unit``) or as given."""
    x = as_feature_tensor(feats, "feats").detach().cpu()
    if normalize:
        return F.normalize(x, dim=1)
    if not require_unit:
        return x
    worst = float((x.norm(dim=1) - 1.0).abs().max())
    if worst > _UNIT_NORM_TOLERANCE:
        raise EvaluationInputError(
            f"feats: rows must be L2-normalised when normalize=False (largest | ||x|| - 1 | = {worst:.3g}); "
            "pass normalize=True, normalise them first, or use them as given with require_unit=False"
        )
    return x


def _pairwise_jaccard(encodings: sp.csr_matrix, max_distance: float | None, max_pairs: int) -> sp.csr_matrix:
    """All-pairs Jaccard distance of the encodings' rows, kept entries only (see jaccard_sparse).

    The overlap is computed once per unordered pair (upper triangle, diagonal included) and mirrored,
    so the result is exactly symmetric.
    """
    num_rows = encodings.shape[0]
    index = OverlapIndex.build(encodings)
    accumulate = OverlapAccumulator(index)
    upper_rows, upper_cols, upper_vals = [], [], []
    for start, end in plan_row_chunks(index, max_pairs=max_pairs, max_rows=accumulate.max_rows):
        cell, overlap = accumulate(start, end)
        row, col = cell // num_rows + start, cell % num_rows
        dist = jaccard_from_overlap(torch.from_numpy(overlap)).clamp_(min=0.0).numpy()
        is_diag = row == col
        dist[is_diag] = 0.0  # exact; rounding would leave ~1e-7
        keep = ((dist <= max_distance) if max_distance is not None else (dist < 1.0)) | is_diag
        upper_rows.append(row[keep])
        upper_cols.append(col[keep])
        upper_vals.append(dist[keep])
    return _symmetric_csr(np.concatenate(upper_rows), np.concatenate(upper_cols), np.concatenate(upper_vals),
                          num_rows)


def _symmetric_csr(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, size: int) -> sp.csr_matrix:
    """CSR with sorted indices from upper-triangle entries (``cols >= rows``), mirrored below the
    diagonal, with an explicit zero on every diagonal cell (also for a row with an empty encoding,
    which overlaps nothing, not even itself). Explicit zeros are kept."""
    has_diagonal = np.zeros(size, dtype=bool)
    has_diagonal[rows[rows == cols]] = True
    missing = np.flatnonzero(~has_diagonal)
    strict = cols > rows
    all_rows = np.concatenate([rows, cols[strict], missing])
    all_cols = np.concatenate([cols, rows[strict], missing])
    all_vals = np.concatenate([values, values[strict], np.zeros(missing.size, dtype=np.float32)])
    order = np.argsort(all_rows * size + all_cols)
    all_rows, all_cols, all_vals = all_rows[order], all_cols[order], all_vals[order]
    indptr = np.zeros(size + 1, dtype=np.int64)
    np.cumsum(np.bincount(all_rows, minlength=size), out=indptr[1:])
    index_dtype = np.int32 if indptr[-1] < np.iinfo(np.int32).max else np.int64
    return sp.csr_matrix((all_vals, all_cols.astype(index_dtype), indptr.astype(index_dtype)), shape=(size, size))
