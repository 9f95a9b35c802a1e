"""k-reciprocal encodings and their Jaccard overlap, sparse (Zhong et al., CVPR'17).

One implementation shared by the re-ranking (:func:`passreid.eval.rerank.re_ranking`) and the
Cluster-Contrast Jaccard distance (:func:`passreid.cluster.jaccard_sparse`). Given each point's
neighbour list ``neighbors`` (N, K), nearest first (the point itself normally first):

1. ``F_k(i) = neighbors[i, :k+1]`` (fewer when ``K < k+1``) and the k-reciprocal set
   ``R(i, k) = {j ∈ F_k(i) : i ∈ F_k(j)}``.
2. Expansion: ``E(i) = R(i, k1) ∪ R(c, h)`` over the candidates ``c ∈ R(i, k1)`` with
   ``|R(c, h) ∩ R(i, k1)| > 2/3 |R(c, h)|``, where ``h = round(k1 / 2)`` (half to even, like
   ``numpy.around``).
3. Encoding: ``V[i, j] = exp(−d(i, j)) / Σ_{l ∈ E(i)} exp(−d(i, l))`` for ``j ∈ E(i)``, else 0.
4. Local query expansion (``k2 != 1``): ``V'[i] = mean of V[j] over j ∈ neighbors[i, :k2]``.
5. Jaccard distance ``1 − s / (2 − s)`` with ``s = Σ_t min(V'[a, t], V'[b, t])``; it equals
   ``1 − Σmin / Σmax`` because every row of ``V'`` sums to 1.

What differs between the two users is passed in, not re-implemented:

=====================  ====================================  =======================================
                       re-ranking (Zhong et al., PASS)        Cluster-Contrast Jaccard
=====================  ====================================  =======================================
neighbour lists        full ranking: ``K = k1 + 1`` columns   only ``k1`` requested (faiss): ``F_k1``
                       (``max(k1 + 1, k2)``)                  has ``k1`` entries, ``F_h`` ``h + 1``
``d`` in the weights   squared Euclidean / its row maximum    ``2 − 2 x_i·x_j`` (unit rows)
Jaccard evaluated for  query rows x gallery rows (dense)      all pairs, sparse (entries < 1)
=====================  ====================================  =======================================

Everything is sparse: the sets are ``(N, K)`` index lists, ``V`` and ``V'`` are CSR matrices with a
few dozen entries per row, and the overlap ``s`` is accumulated only for pairs that share a
non-zero column (through an inverted index, the CSC form of ``V'``), ``O(Σ_t nnz(column t)²)``
work. No ``N x N`` array is ever built. The weights are computed as a softmax with the row minimum
subtracted, which is the same quantity as ``exp(−d) / Σ exp(−d)`` but cannot overflow.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

__all__ = [
    "PairDistanceFn",
    "SparseRows",
    "half_neighbourhood",
    "k_reciprocal_mask",
    "expanded_reciprocal_sets",
    "encode_neighbourhoods",
    "local_query_expansion",
    "pair_dot_products",
    "k_reciprocal_encodings",
    "jaccard_from_overlap",
    "OverlapIndex",
    "plan_row_chunks",
    "overlap_into_dense",
    "OverlapAccumulator",
]

#: ``fn(rows, cols) -> d`` for 1-D int64 index tensors (all pairs at once): the weight distances.
PairDistanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Row chunk size of the vectorised set computations (memory ~ rows x K² x a few bytes).
_SET_CHUNK_ROWS = 1024
# Pairs generated at once by the overlap (about 60 bytes each in temporaries).
DEFAULT_MAX_PAIRS = 500_000


def half_neighbourhood(k1: int) -> int:
    """``round(k1 / 2)`` with round-half-to-even, as ``numpy.around`` in the published code."""
    return int(round(k1 / 2))


def k_reciprocal_mask(lists: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``mask[r, a]``: is ``j = lists[rows[r], a]`` k-reciprocal, i.e. is ``rows[r]`` in ``lists[j]``.

    ``lists`` (N, w) holds each point's ``F_k`` (its first ``w = min(k + 1, K)`` neighbours).
    Returns a bool array ``(len(rows), w)``.
    """
    candidates = np.take(lists, rows, axis=0)  # (B, w): F_k(i)
    backward = np.take(lists, candidates, axis=0)  # (B, w, w): F_k(j) for each j in F_k(i)
    return (backward == rows[:, None, None]).any(axis=2)


def expanded_reciprocal_sets(neighbors: torch.Tensor | np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """The expanded sets ``E(i)`` (steps 1-2 of the module docstring) as COO ``(rows, cols)`` int64.

    Sorted by row, then column, each pair once. Vectorised over row chunks (numpy: its gathers and
    row sorts are several times faster than torch's on the CPU).
    """
    neighbors = np.asarray(neighbors)
    num_rows = neighbors.shape[0]
    index_type = np.int32 if num_rows < np.iinfo(np.int32).max else np.int64
    width = min(k1 + 1, neighbors.shape[1])
    half_width = min(half_neighbourhood(k1) + 1, neighbors.shape[1])
    lists = np.ascontiguousarray(neighbors[:, :width], dtype=index_type)  # F_k1
    half_lists = np.ascontiguousarray(neighbors[:, :half_width], dtype=index_type)  # F_h
    half_mask = np.concatenate([k_reciprocal_mask(half_lists, np.arange(s, min(s + _SET_CHUNK_ROWS, num_rows)))
                                for s in range(0, num_rows, _SET_CHUNK_ROWS)])
    out_rows, out_cols = [], []
    for start in range(0, num_rows, _SET_CHUNK_ROWS):
        rows = np.arange(start, min(start + _SET_CHUNK_ROWS, num_rows))
        cand = lists[start:rows[-1] + 1]  # (B, w)
        in_r = k_reciprocal_mask(lists, rows)  # (B, w): cand ∈ R(i, k1)
        cand_half = np.take(half_lists, cand, axis=0)  # (B, w, h'): F_h(c)
        cand_half_in = np.take(half_mask, cand, axis=0)  # (B, w, h'): member of R(c, h)
        # |R(c, h) ∩ R(i, k1)|: look the members of R(c, h) up in the sorted R(i, k1) (non-members of
        # R(i, k1) become the sentinel N, which matches no index). One flat search: offsetting row r
        # by r * (N + 1) keeps the concatenated rows sorted.
        reciprocal = np.where(in_r, cand, num_rows)
        offset = (np.arange(len(rows), dtype=np.int64) * (num_rows + 1))[:, None]
        sorted_flat = (np.sort(reciprocal, axis=1) + offset).ravel()
        queries = (cand_half.reshape(len(rows), -1) + offset).ravel()
        slot = np.minimum(np.searchsorted(sorted_flat, queries), sorted_flat.size - 1)
        found = (sorted_flat[slot] == queries).reshape(cand_half.shape)
        overlap = (found & cand_half_in).sum(axis=-1)
        size = cand_half_in.sum(axis=-1)
        accept = in_r & (3 * overlap > 2 * size)  # integer form of overlap > 2/3 size
        members = np.concatenate([
            reciprocal,
            np.where(cand_half_in & accept[..., None], cand_half, num_rows).reshape(len(rows), -1),
        ], axis=1)
        members.sort(axis=1)
        keep = members < num_rows
        keep[:, 1:] &= members[:, 1:] != members[:, :-1]
        flat = np.flatnonzero(keep)
        out_rows.append(flat // members.shape[1] + start)
        out_cols.append(members.ravel()[flat].astype(np.int64))
    return np.concatenate(out_rows), np.concatenate(out_cols)


def encode_neighbourhoods(rows: torch.Tensor, cols: torch.Tensor, distances: torch.Tensor,
                          num_rows: int, num_cols: int) -> sp.csr_matrix:
    """Step 3: ``V[i, j] = softmax over E(i) of −d(i, j)`` as a float32 CSR matrix.

    ``rows`` must be sorted (as returned by :func:`expanded_reciprocal_sets`).
    """
    distances = distances.float()
    row_min = torch.full((num_rows,), float("inf")).scatter_reduce_(0, rows, distances, reduce="amin")
    weights = torch.exp(-(distances - row_min[rows]))
    row_sum = torch.zeros(num_rows).index_add_(0, rows, weights)
    values = weights / row_sum[rows]
    indptr = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows.numpy(), minlength=num_rows), out=indptr[1:])
    return sp.csr_matrix((values.numpy(), cols.numpy(), indptr), shape=(num_rows, num_cols))


def local_query_expansion(encodings: sp.csr_matrix, neighbors: torch.Tensor, k2: int) -> sp.csr_matrix:
    """Step 4: average each row's encoding over its first ``min(k2, K)`` neighbours (none if ``k2 == 1``).

    ``k2 == 1`` leaves ``V`` unchanged, as the published code does (even when a duplicate and not
    the point itself comes first in its neighbour list).
    """
    if k2 == 1:
        return encodings
    num_rows = neighbors.shape[0]
    width = min(k2, neighbors.shape[1])
    averaging = sp.csr_matrix(
        (np.full(num_rows * width, 1.0 / width, dtype=np.float32),
         neighbors[:, :width].reshape(-1).numpy(),
         np.arange(0, num_rows * width + 1, width, dtype=np.int64)),
        shape=(num_rows, encodings.shape[0]),
    )
    expanded = (averaging @ encodings).tocsr()
    expanded.sort_indices()
    return expanded


def pair_dot_products(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *,
                      chunk: int = 4096) -> torch.Tensor:
    """``x[rows[p]] · x[cols[p]]`` for every pair ``p``, in chunks through two reused buffers (no
    per-chunk allocations, which would fragment the heap and inflate the resident memory)."""
    out = torch.empty(rows.numel(), dtype=x.dtype)
    left = torch.empty(min(chunk, rows.numel()), x.shape[1], dtype=x.dtype)
    right = torch.empty_like(left)
    for start in range(0, rows.numel(), chunk):
        end = min(start + chunk, rows.numel())
        a = torch.index_select(x, 0, rows[start:end], out=left[:end - start])
        b = torch.index_select(x, 0, cols[start:end], out=right[:end - start])
        torch.sum(torch.mul(a, b, out=a), dim=1, out=out[start:end])
    return out


def k_reciprocal_encodings(neighbors: torch.Tensor, k1: int, k2: int, pair_distance: PairDistanceFn) -> sp.csr_matrix:
    """Steps 1-4: the query-expanded k-reciprocal encodings ``V'`` (N x N CSR, float32).

    ``neighbors`` (N, K) int64, nearest first; ``pair_distance(rows, cols)`` gives the weight
    distances for all the index pairs of the expanded sets at once.
    """
    neighbors = neighbors.to(torch.int64).cpu()
    rows, cols = (torch.from_numpy(a) for a in expanded_reciprocal_sets(neighbors.numpy(), k1))
    distances = pair_distance(rows, cols).float().cpu()
    num_rows = neighbors.shape[0]
    encodings = encode_neighbourhoods(rows, cols, distances, num_rows, num_rows)
    return local_query_expansion(encodings, neighbors, k2)


def jaccard_from_overlap(overlap: torch.Tensor) -> torch.Tensor:
    """Step 5: ``1 − s / (2 − s)`` (in place on a float tensor of overlaps ``s``)."""
    return overlap.div_(overlap.neg().add_(2.0)).neg_().add_(1.0)


@dataclass(frozen=True)
class SparseRows:
    """A CSR matrix as numpy arrays (int64 ``indptr``/``indices``, float32 ``data``), sorted indices.

    The overlap code below works on numpy arrays: ``np.take``/``np.repeat`` gather several times
    faster than torch's advanced indexing on the CPU, and ``np.add.at`` sums serially, in order.
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def from_scipy(cls, matrix: sp.spmatrix) -> SparseRows:
        csr = sp.csr_matrix(matrix)
        csr.sort_indices()
        return cls(csr.indptr.astype(np.int64), csr.indices.astype(np.int64), csr.data.astype(np.float32),
                   (int(csr.shape[0]), int(csr.shape[1])))

    def row_of_entry(self) -> np.ndarray:
        """The row index of every stored entry."""
        return np.repeat(np.arange(self.shape[0], dtype=np.int64), np.diff(self.indptr))


@dataclass(frozen=True)
class OverlapIndex:
    """What the overlap ``s(a, b) = Σ_t min(V[a, t], W[b, t])`` needs, built once.

    ``rows`` holds the encodings ``V`` of the rows to compare, ``by_column`` the other side ``W``
    transposed (the inverted index: column ``t`` -> the rows ``b`` with ``W[b, t] > 0``, ascending).
    For every stored entry ``(a, t)`` of ``rows``, its pairs are ``by_column`` positions
    ``pair_start .. pair_start + pair_count``: the whole column ``t``, or, when ``V`` is compared with
    itself (``upper_triangle``), only the rows ``b >= a``, which halves the work of a symmetric result.
    """

    rows: SparseRows
    by_column: SparseRows
    pair_start: np.ndarray
    pair_count: np.ndarray
    upper_triangle: bool

    @classmethod
    def build(cls, encodings: sp.spmatrix, others: sp.spmatrix | None = None) -> OverlapIndex:
        """Compare ``encodings`` with ``others``, or with themselves (upper triangle) when ``None``."""
        rows = SparseRows.from_scipy(encodings)
        by_column = SparseRows.from_scipy((encodings if others is None else others).T)
        column_end = by_column.indptr[rows.indices + 1]
        if others is None:
            # Global search keys "t * M + b" of the inverted index are ascending: find b >= a.
            num_other = by_column.shape[1]
            keys = by_column.row_of_entry() * num_other + by_column.indices
            pair_start = np.searchsorted(keys, rows.indices * num_other + rows.row_of_entry())
        else:
            pair_start = by_column.indptr[rows.indices]
        return cls(rows, by_column, pair_start, column_end - pair_start, others is None)

    @property
    def num_other(self) -> int:
        return self.by_column.shape[1]


def plan_row_chunks(index: OverlapIndex, *, max_pairs: int = DEFAULT_MAX_PAIRS,
                    max_rows: int) -> list[tuple[int, int]]:
    """Contiguous row ranges generating at most ``max_pairs`` pairs (one row may exceed it alone)
    and spanning at most ``max_rows`` rows."""
    per_entry = np.concatenate([[0], np.cumsum(index.pair_count)])
    cumulative = per_entry[index.rows.indptr]  # pairs generated by rows [0, r)
    num_rows = index.rows.shape[0]
    chunks, start = [], 0
    while start < num_rows:
        end = int(np.searchsorted(cumulative, cumulative[start] + max_pairs, side="right")) - 1
        end = min(max(end, start + 1), start + max_rows, num_rows)
        chunks.append((start, end))
        start = end
    return chunks


def _overlap_pairs(index: OverlapIndex, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair ``(row, other)`` of rows ``start:end`` sharing a column ``t``, as a flat cell
    ``(row - start) * M + other``, with ``min(V[row, t], W[other, t])``.

    Within a row the pairs come in increasing ``t``, so a sum over them has the same order for
    ``(a, b)`` and ``(b, a)``.
    """
    rows, by_column = index.rows, index.by_column
    lo, hi = int(rows.indptr[start]), int(rows.indptr[end])
    count = index.pair_count[lo:hi]
    entry = np.repeat(np.arange(hi - lo), count)
    # Position of each pair inside by_column: its entry's first position + its rank within the entry.
    first_pair = np.cumsum(count) - count
    position = np.arange(entry.size) + np.take(index.pair_start[lo:hi] - first_pair, entry)
    entry_cell = np.repeat(np.arange(end - start, dtype=np.int64) * index.num_other, np.diff(rows.indptr[start:end + 1]))
    cell = np.take(entry_cell, entry) + np.take(by_column.indices, position)
    minimum = np.minimum(np.take(rows.data[lo:hi], entry), np.take(by_column.data, position))
    return cell, minimum


def overlap_into_dense(index: OverlapIndex, start: int, end: int, out: torch.Tensor) -> None:
    """Add ``s = Σ_t min`` for rows ``start:end`` against every other row into ``out`` (end-start, M),
    a contiguous float32 CPU tensor."""
    cell, minimum = _overlap_pairs(index, start, end)
    np.add.at(out.numpy().reshape(-1), cell, minimum)


class OverlapAccumulator:
    """Sparse ``s = Σ_t min`` per row chunk: the distinct ``(row, other)`` cells and their sums.

    Two ways to merge the pairs that hit the same cell, chosen by the size ``M`` of the other side:

    * scratch (``M`` up to ``SCRATCH_CELLS / MIN_SCRATCH_ROWS``): add the pairs into a reusable flat
      ``rows x M`` float buffer, write each pair's ordinal into a same-sized marker buffer (one write
      survives per cell, so the pairs whose ordinal survived are the distinct cells), read the sums
      of those cells and reset them: ``O(pairs)``, no scan of all the cells. Chunks are limited to
      ``max_rows`` rows;
    * sort (larger ``M``, where the scratch would hold only a few rows): ``unique`` of the chunk's
      cells, then add the pairs into one slot per distinct cell.

    The cells come back in no particular order. Both modes add the pairs in the same order, so
    the sums are bit-identical either way.
    """

    #: Cells of each scratch buffer (float32 sums + int32 markers: 32 MiB in all).
    SCRATCH_CELLS = 2**22
    #: Use the scratch when it holds at least this many rows.
    MIN_SCRATCH_ROWS = 64

    def __init__(self, index: OverlapIndex, *, scratch: bool | None = None) -> None:
        self.index = index
        num_rows, num_other = index.rows.shape[0], index.num_other
        scratch_rows = self.SCRATCH_CELLS // num_other
        if scratch is None:
            scratch = scratch_rows >= self.MIN_SCRATCH_ROWS
        self.max_rows = max(1, scratch_rows) if scratch else max(num_rows, 1)
        cells = min(self.max_rows, num_rows) * num_other if scratch else 0
        self.sums = np.zeros(cells, dtype=np.float32) if scratch else None
        self.marker = np.empty(cells, dtype=np.int32) if scratch else None

    def __call__(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(cell, s)``: the distinct flat cells ``local_row * M + other`` and their overlaps."""
        cell, minimum = _overlap_pairs(self.index, start, end)
        if self.sums is None or self.marker is None:
            distinct, slot = np.unique(cell, return_inverse=True)
            overlap = np.zeros(distinct.size, dtype=np.float32)
            np.add.at(overlap, slot, minimum)
            return distinct, overlap
        if end - start > self.max_rows:
            raise ValueError(f"chunk of {end - start} rows exceeds the scratch capacity of {self.max_rows} rows")
        np.add.at(self.sums, cell, minimum)
        ordinal = np.arange(cell.size, dtype=np.int32)
        self.marker[cell] = ordinal  # numpy keeps the last write of a repeated index
        distinct = cell[self.marker[cell] == ordinal]
        overlap = self.sums[distinct]
        self.sums[distinct] = 0.0
        return distinct, overlap
