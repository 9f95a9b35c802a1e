"""Exact k-nearest neighbours of a feature set against itself (self included).

Two backends give the same neighbours (exact search, float32):

* ``"torch"``: blocks of dot products ``X_a X_bᵀ`` (each off-diagonal block computed once and used
  for both row blocks, half the matmul work), scored ``2 x_i·x_j − ||x_j||²``, with a running top-k
  per row: after a plain ``topk`` of each row's own block, later blocks only contribute the scores
  above the row's current k-th best. The squared Euclidean distance is ``||x_i||² − score``, so the
  largest scores are the nearest points. Memory is a few ``block x block`` arrays, never ``N x N``.
  Runs on ``device`` (CUDA when available).
* ``"faiss"``: ``faiss.IndexFlatL2`` / ``IndexFlatIP``, moved to all GPUs when ``device`` is CUDA and
  faiss was built with GPU support (the ``gpu`` extra installs ``faiss-gpu``); on the CPU it runs
  with torch's thread count. faiss is imported only here, so it stays optional.

``backend="auto"`` (:func:`resolve_knn_backend`): faiss when it is installed and either has GPUs
(and the search is not pinned to the CPU) or the search runs on the CPU with more than one torch
thread; torch otherwise (faiss missing, one CPU thread, or a CUDA device that faiss cannot use).
Measured with ``bench/bench_knn.py`` on the 2-core development machine (faiss-cpu 1.15.1, k = 30,
exact same neighbour sets from both): with one thread torch is slightly faster (12,936 x 768:
2.96 s vs 3.16 s; 32,621 x 384: 8.3 s vs 10.3 s); with two threads on the shared machine torch
degrades to 8.4 s and 46 s while faiss takes 3.8 s and 13.4 s (2.2-3.7x faster). The figures and the
command are in ``bench/README.md``.

**Ties.** Neighbours at exactly equal distance may come back in a different order from the two
backends (and the order of equal distances is unspecified in both); the sets of distances agree up
to float rounding. Duplicate features are therefore interchangeable in the neighbour lists.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from passreid.feature_inputs import EvaluationInputError, as_feature_tensor, resolve_device

__all__ = ["knn", "knn_with_farthest", "faiss_installed", "resolve_knn_backend", "DEFAULT_KNN_MEMORY_MB"]

Backend = Literal["auto", "faiss", "torch"]
KnnMetric = Literal["sqeuclidean", "inner_product"]
_BACKENDS = ("auto", "faiss", "torch")
_METRICS = ("sqeuclidean", "inner_product")

#: Memory budget of the torch backend's dot-product blocks, in MiB.
DEFAULT_KNN_MEMORY_MB = 32


def knn(
    feats: torch.Tensor | np.ndarray,
    k: int,
    *,
    backend: Backend = "auto",
    metric: KnnMetric = "sqeuclidean",
    device: str | torch.device | None = None,
    memory_budget_mb: float = DEFAULT_KNN_MEMORY_MB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``feats`` (N, D) for every row, the row itself included.

    Returns ``(distances, indices)``, both ``(N, min(k, N))`` CPU tensors (float32, int64), nearest
    first. ``metric="sqeuclidean"`` gives squared Euclidean distances (ascending);
    ``metric="inner_product"`` gives inner products (descending). ``k`` larger than ``N`` is capped
    at ``N``. See the module docstring for the backends and for ties.
    """
    x = as_feature_tensor(feats, "feats")
    k = _checked_k(k, x.shape[0])
    if metric not in _METRICS:
        raise EvaluationInputError(f"unknown kNN metric {metric!r}; expected one of {_METRICS}")
    target = resolve_device(device)
    if resolve_knn_backend(backend, target) == "faiss":
        return _faiss_knn(x, k, metric, use_gpus=target.type == "cuda")
    dist, idx, _ = _torch_knn(x, k, metric, target, memory_budget_mb, want_farthest=False)
    return dist, idx


def knn_with_farthest(
    feats: torch.Tensor | np.ndarray,
    k: int,
    *,
    device: str | torch.device | None = None,
    memory_budget_mb: float = DEFAULT_KNN_MEMORY_MB,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared-Euclidean ``knn`` (torch backend) plus each row's largest distance to any row.

    Returns ``(distances, indices, farthest)`` with ``farthest`` (N,) float32. The farthest
    distance comes from the same chunked pass, so the ``N x N`` matrix is never stored; k-reciprocal
    re-ranking needs it to normalise distances.
    """
    x = as_feature_tensor(feats, "feats")
    k = _checked_k(k, x.shape[0])
    dist, idx, farthest = _torch_knn(x, k, "sqeuclidean", resolve_device(device), memory_budget_mb,
                                     want_farthest=True)
    assert farthest is not None
    return dist, idx, farthest


def resolve_knn_backend(backend: Backend, device: str | torch.device | None = None) -> Literal["faiss", "torch"]:
    """Check the backend name and resolve ``"auto"`` for a search on ``device`` (``None``: CUDA when
    available, else the CPU), as the module docstring says: faiss when it is installed and has GPUs
    (unless ``device`` is the CPU), or when the search runs on the CPU with more than one torch thread;
    torch otherwise."""
    if backend not in _BACKENDS:
        raise EvaluationInputError(f"unknown kNN backend {backend!r}; expected one of {_BACKENDS}")
    if backend == "faiss" and not faiss_installed():
        raise EvaluationInputError("kNN backend 'faiss' asked for, but faiss is not installed: pip install "
                                   "'passreid[faiss]' (CPU) or 'passreid[gpu]', or use the backend auto or torch")
    if backend != "auto":
        return backend
    try:
        import faiss
    except ImportError:
        return "torch"
    target = resolve_device(device)
    if target.type == "cuda":
        return "faiss" if _faiss_gpus(faiss) > 0 else "torch"
    if target.type == "cpu":
        # faiss-cpu loses ~5-20 % to torch on one thread and wins 2-4x on two (bench/bench_knn.py).
        return "faiss" if torch.get_num_threads() > 1 else "torch"
    return "torch"  # another accelerator (e.g. mps): torch runs there, faiss does not


def faiss_installed() -> bool:
    """Whether ``import faiss`` works (faiss-cpu or faiss-gpu)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_gpus(faiss) -> int:
    """GPUs faiss can use: 0 for a CPU build (no ``get_num_gpus``) or when CUDA is unavailable."""
    if not hasattr(faiss, "get_num_gpus") or not torch.cuda.is_available():
        return 0
    return int(faiss.get_num_gpus())


def _checked_k(k: int, num_rows: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise EvaluationInputError(f"k must be a positive integer, got {k!r}")
    return min(int(k), num_rows)


def _block_size(num_rows: int, memory_budget_mb: float) -> int:
    # An off-diagonal block pair holds two float32 score blocks and a bool mask: ~10 bytes per cell.
    return max(1, min(num_rows, int((memory_budget_mb * 2**20 / 10) ** 0.5)))


class _RunningTopK:
    """Each row's ``k`` largest scores seen so far (and, optionally, its lowest score)."""

    def __init__(self, num_rows: int, k: int, device: torch.device, track_lowest: bool) -> None:
        self.k = k
        self.score = torch.full((num_rows, k), float("-inf"), device=device)
        self.index = torch.zeros((num_rows, k), dtype=torch.int64, device=device)
        self.lowest = torch.full((num_rows,), float("inf"), device=device) if track_lowest else None

    def seed(self, rows: slice, score: torch.Tensor, col_offset: int) -> None:
        """First block of these rows: a plain top-k (fewer than k columns leave -inf slots)."""
        width = min(self.k, score.shape[1])
        values, idx = score.topk(width, dim=1, largest=True, sorted=True)
        self.score[rows, :width] = values
        self.index[rows, :width] = idx + col_offset
        if self.lowest is not None:
            self._update_lowest(rows, score.amin(dim=1))

    def offer(self, rows: slice, score: torch.Tensor, col_offset: int, *, rows_along_columns: bool) -> None:
        """Merge a later block. Only scores above a row's current k-th best can enter its list, so
        only those (few, once the lists are seeded) are extracted and merged, instead of a top-k
        over the whole block. ``rows_along_columns``: ``score[c, r]`` belongs to row ``r``."""
        kth = self.score[rows, -1]
        threshold = kth[None, :] if rows_along_columns else kth[:, None]
        flat = _flat_indices_above(score, threshold)
        first, second = flat // score.shape[1], flat % score.shape[1]
        local_row, col = (second, first) if rows_along_columns else (first, second)
        if self.lowest is not None:
            self._update_lowest(rows, score.amin(dim=0 if rows_along_columns else 1))
        if local_row.numel():
            self._merge(rows, local_row, col + col_offset, score.view(-1)[flat])

    def _merge(self, rows: slice, local_row: torch.Tensor, col: torch.Tensor, value: torch.Tensor) -> None:
        # Lay the candidates out as a ragged (rows, k + max candidates) matrix next to the current
        # lists, then one small top-k per row.
        num = rows.stop - rows.start
        order = torch.argsort(local_row, stable=True)
        local_row, col, value = local_row[order], col[order], value[order]
        counts = torch.bincount(local_row, minlength=num)
        slot = torch.arange(local_row.numel(), device=local_row.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts)
        width = self.k + int(counts.max())
        values = torch.full((num, width), float("-inf"), device=value.device)
        indices = torch.zeros((num, width), dtype=torch.int64, device=value.device)
        values[:, :self.k] = self.score[rows]
        indices[:, :self.k] = self.index[rows]
        values[local_row, self.k + slot] = value
        indices[local_row, self.k + slot] = col
        top, pos = values.topk(self.k, dim=1, largest=True, sorted=True)
        self.score[rows] = top
        self.index[rows] = indices.gather(1, pos)

    def _update_lowest(self, rows: slice, block_lowest: torch.Tensor) -> None:
        assert self.lowest is not None
        self.lowest[rows] = torch.minimum(self.lowest[rows], block_lowest)


def _flat_indices_above(score: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Flat indices of the (contiguous) ``score`` entries ``> threshold`` (broadcast), ascending.

    On the CPU numpy does this several times faster than ``torch.nonzero`` (measured ~7x on a
    1,672² block), and it is the hot loop of the search.
    """
    if score.device.type != "cpu":
        return (score > threshold).view(-1).nonzero().squeeze(1)
    return torch.from_numpy(np.flatnonzero(np.greater(score.numpy(), threshold.numpy())))


@torch.no_grad()
def _torch_knn(
    x: torch.Tensor,
    k: int,
    metric: str,
    device: torch.device,
    memory_budget_mb: float,
    *,
    want_farthest: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Blocked exact self-search. Scores (larger = nearer) are ``2 x_i·x_j − ||x_j||²``
    (``= ||x_i||² − ||x_i − x_j||²``) or ``x_i·x_j``. The diagonal blocks seed every row's list;
    each off-diagonal dot block ``X_a X_bᵀ`` is then computed once and serves the rows of ``a`` and,
    read along its columns, the rows of ``b`` (half the matmul work of a row-by-row search)."""
    num_rows = x.shape[0]
    x = x.to(device)
    sq_norm = x.pow(2).sum(1)
    block = _block_size(num_rows, memory_budget_mb)
    blocks = [slice(start, min(start + block, num_rows)) for start in range(0, num_rows, block)]
    top = _RunningTopK(num_rows, k, device, track_lowest=want_farthest)
    for rows in blocks:
        dot = torch.mm(x[rows], x[rows].t())
        top.seed(rows, dot.mul_(2.0).sub_(sq_norm[rows]) if metric == "sqeuclidean" else dot, rows.start)
    # Two reused block buffers: fresh allocations per block pair fragment the heap (resident memory grows).
    dot_buffer = torch.empty(block * block, device=device)
    score_buffer = torch.empty(block * block, device=device) if metric == "sqeuclidean" else None
    for a_index, rows_a in enumerate(blocks):
        for rows_b in blocks[a_index + 1:]:
            shape = (rows_a.stop - rows_a.start, rows_b.stop - rows_b.start)
            dot = torch.mm(x[rows_a], x[rows_b].t(), out=dot_buffer[:shape[0] * shape[1]].view(shape))
            if score_buffer is not None:
                score_a = score_buffer[:shape[0] * shape[1]].view(shape)
                torch.mul(dot, 2.0, out=score_a).sub_(sq_norm[rows_b])  # rows of a x columns of b
                score_b = dot.mul_(2.0).sub_(sq_norm[rows_a, None])  # same layout, for the rows of b
            else:
                score_a = score_b = dot
            top.offer(rows_a, score_a, rows_b.start, rows_along_columns=False)
            top.offer(rows_b, score_b, rows_a.start, rows_along_columns=True)

    best_score = top.score
    if metric == "sqeuclidean":
        # Rounding can make a distance (e.g. a point to itself) slightly negative.
        best_score = (sq_norm[:, None] - best_score).clamp_(min=0.0)
    farthest = None
    if top.lowest is not None:
        farthest = (sq_norm - top.lowest).clamp_(min=0.0).cpu()
    return best_score.cpu(), top.index.cpu(), farthest


def _faiss_knn(x: torch.Tensor, k: int, metric: str, *, use_gpus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact search with a flat faiss index; on all of faiss's GPUs when ``use_gpus`` and it has any."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("backend='faiss' needs the faiss package (pip install faiss-cpu or faiss-gpu)") from exc
    data = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatL2(data.shape[1]) if metric == "sqeuclidean" else faiss.IndexFlatIP(data.shape[1])
    on_gpu = use_gpus and _faiss_gpus(faiss) > 0
    if on_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    # On the CPU faiss uses as many threads as torch does (its own default is every core).
    previous_threads = None if on_gpu else faiss.omp_get_max_threads()
    if previous_threads is not None:
        faiss.omp_set_num_threads(torch.get_num_threads())
    try:
        index.add(data)
        dist, idx = index.search(data, k)
    finally:
        if previous_threads is not None:
            faiss.omp_set_num_threads(previous_threads)
    if metric == "sqeuclidean":
        dist = np.maximum(dist, 0.0)
    return torch.from_numpy(np.ascontiguousarray(dist, dtype=np.float32)), torch.from_numpy(idx.astype(np.int64))
