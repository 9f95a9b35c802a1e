"""Exact, query-chunked CMC / mAP / mINP under the Market-1501 protocol.

Protocol (TransReID / PASS-reID: utils/metrics.py ``eval_func``; mINP as fast-reid's
``fastreid/evaluation/rank.py``), per query with pid ``p`` and camera ``c``:

1. Rank the gallery by ascending distance. **Tie rule:** equal distances are ordered by gallery
   index (a stable sort by distance, then gallery index), so results are reproducible.
2. Remove gallery items with the same pid **and** the same camera as the query. Same-camera items of
   other pids, pid-0 distractors and any other pid (junk ``-1`` included; it must be dropped when
   the dataset is loaded) stay in the ranking.
3. Positives = the remaining items with pid ``p``. A query without positives is skipped: it counts in
   no numerator or denominator. If every query is skipped, :class:`EvaluationInputError` is raised.
4. CMC: ``cmc[k] = 1`` if the first positive is within the top ``k + 1`` of the kept ranking, for
   ``k < min(max_rank, num_gallery)`` (truncated to the gallery size when the gallery is smaller
   than ``max_rank``, as in the published evaluators), averaged over valid queries.
5. AP over the whole kept ranking: the mean of precision@position over the positives.
6. INP = #positives / (1 + position of the last positive in the kept ranking); mINP = mean.

Implementation: queries are processed in chunks of ``chunk_size`` rows, so memory is bounded by
``chunk_size x num_gallery`` (plus the features); the full query x gallery matrix is never sorted
or stored. Per chunk, everything is vectorised over the queries (no Python loop per query) and runs
on the chunk's device (CUDA when present). No row is fully sorted either: a query's positives come
from a gallery index grouped by pid and only they are sorted (a handful per query); the position of
the ``k``-th positive in the kept ranking is ``k + #negatives ranked before it``, and only negatives
at most as far as the row's last positive can precede one, so only those are located among the
positives with a binary search (``torch.searchsorted``; per candidate when they are few, over
whole rows when they are many). Ties with positives are resolved by gallery index explicitly, so
the positions are exactly those of a stable full sort, at a few ``O(G)`` passes plus ``O(log R)``
per candidate instead of an ``O(G log G)`` sort per query. For a given distance matrix the results are
identical whatever the chunk size.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from passreid.eval.distance import (
    DistanceChunkFn,
    EvaluationInputError,
    FeatureDistance,
    Metric,
    resolve_device,
)

__all__ = [
    "RankResult",
    "rank_metrics",
    "rank_metrics_from_distance",
    "default_chunk_size",
    "DEFAULT_MEMORY_BUDGET_MB",
]

#: Default memory budget for one query chunk (distances, masks, search results), in MiB.
DEFAULT_MEMORY_BUDGET_MB = 256
# Rough peak bytes per (query, gallery) element of a chunk: the float32 distance (+ the matmul's
# temporary), four bool masks, the int64 search result and the int64 scatter index.
_BYTES_PER_ELEMENT = 40


@dataclass
class RankResult:
    """Rank metrics of one evaluation; ``cmc``, ``mAP`` and ``mINP`` are fractions in [0, 1]."""

    cmc: np.ndarray  # (min(max_rank, num_gallery),) float64; cmc[k-1] = Rank-k
    mAP: float
    mINP: float
    num_valid_queries: int
    num_queries: int
    num_gallery: int
    chunk_size: int
    # Per-query AP and INP, NaN for skipped queries (for error analysis; not in to_dict()).
    query_ap: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))
    query_inp: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))

    def rank(self, k: int) -> float:
        """Rank-``k`` accuracy (1-based)."""
        if not 1 <= k <= len(self.cmc):
            raise ValueError(f"rank {k} is outside the computed CMC range 1..{len(self.cmc)}")
        return float(self.cmc[k - 1])

    def to_dict(self) -> dict:
        """JSON-friendly summary: mAP, mINP, cmc (list) and the query/gallery counts."""
        return {
            "mAP": self.mAP,
            "mINP": self.mINP,
            "cmc": [float(v) for v in self.cmc],
            "num_valid_queries": self.num_valid_queries,
            "num_queries": self.num_queries,
            "num_gallery": self.num_gallery,
        }

    def format_table(self, ranks: Sequence[int] = (1, 5, 10)) -> str:
        """Two-line table of Rank-k (for the ``ranks`` within the CMC length), mAP and mINP, in %."""
        columns = [(f"Rank-{k}", self.rank(k)) for k in ranks if k <= len(self.cmc)]
        columns += [("mAP", self.mAP), ("mINP", self.mINP)]
        header = "  ".join(f"{name:>8}" for name, _ in columns)
        values = "  ".join(f"{100.0 * value:8.2f}" for _, value in columns)
        return f"{header}\n{values}"


def default_chunk_size(num_gallery: int, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> int:
    """Number of queries per chunk so that one chunk's work stays within ``memory_budget_mb``."""
    if num_gallery < 1 or memory_budget_mb <= 0:
        raise EvaluationInputError(
            f"need num_gallery >= 1 and memory_budget_mb > 0, got {num_gallery} and {memory_budget_mb}"
        )
    return max(1, int(memory_budget_mb * 2**20) // (_BYTES_PER_ELEMENT * num_gallery))


def rank_metrics(
    query_feats: torch.Tensor | np.ndarray,
    gallery_feats: torch.Tensor | np.ndarray,
    q_pids: Sequence[int] | np.ndarray | torch.Tensor,
    g_pids: Sequence[int] | np.ndarray | torch.Tensor,
    q_camids: Sequence[int] | np.ndarray | torch.Tensor,
    g_camids: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    metric: Metric = "euclidean",
    normalize: bool = True,
    max_rank: int = 50,
    chunk_size: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    device: str | torch.device | None = None,
) -> RankResult:
    """CMC, mAP and mINP from query/gallery features (see the module docstring for the protocol).

    ``metric="euclidean"`` ranks by squared Euclidean distance on L2-normalised features
    (``normalize=True``, the default; rank-identical to the plain distance) or on raw features
    (``normalize=False``); ``metric="cosine"`` by ``1 − cos``. Distances are float32 matmuls
    computed one query chunk at a time on ``device`` (default: CUDA when available, else CPU).
    ``chunk_size`` defaults to :func:`default_chunk_size` for ``memory_budget_mb``.
    """
    distance = FeatureDistance(query_feats, gallery_feats, metric=metric, normalize=normalize, device=device)
    q_pids, g_pids = _as_id_tensor(q_pids, "query pids"), _as_id_tensor(g_pids, "gallery pids")
    _check_length(q_pids, distance.num_query, "query pids", "query features")
    _check_length(g_pids, distance.num_gallery, "gallery pids", "gallery features")
    return rank_metrics_from_distance(
        distance, q_pids, g_pids, q_camids, g_camids,
        max_rank=max_rank, chunk_size=chunk_size, memory_budget_mb=memory_budget_mb, device=distance.device,
    )


def rank_metrics_from_distance(
    distance: DistanceChunkFn | torch.Tensor | np.ndarray,
    q_pids: Sequence[int] | np.ndarray | torch.Tensor,
    g_pids: Sequence[int] | np.ndarray | torch.Tensor,
    q_camids: Sequence[int] | np.ndarray | torch.Tensor,
    g_camids: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    max_rank: int = 50,
    chunk_size: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    device: str | torch.device | None = None,
) -> RankResult:
    """CMC, mAP and mINP from a distance (ascending = more similar).

    ``distance`` is either a precomputed ``(Q, G)`` tensor/array (read one chunk of rows at a time)
    or a chunk function ``fn(q_start, q_end) -> Tensor (q_end - q_start, G)`` such as
    :class:`~passreid.eval.distance.FeatureDistance` or
    :class:`~passreid.eval.distance.VisiblePartDistance`. Distances must be finite. ``Q`` and ``G``
    are taken from the pid arrays. Chunks are moved to ``device`` (default: CUDA when available).
    """
    q_pid_t = _as_id_tensor(q_pids, "query pids")
    g_pid_t = _as_id_tensor(g_pids, "gallery pids")
    q_cam_t = _as_id_tensor(q_camids, "query camids")
    g_cam_t = _as_id_tensor(g_camids, "gallery camids")
    _check_length(q_cam_t, len(q_pid_t), "query camids", "query pids")
    _check_length(g_cam_t, len(g_pid_t), "gallery camids", "gallery pids")
    num_query, num_gallery = len(q_pid_t), len(g_pid_t)
    if not isinstance(max_rank, int) or max_rank < 1:
        raise EvaluationInputError(f"max_rank must be a positive integer, got {max_rank!r}")
    if chunk_size is None:
        chunk_size = default_chunk_size(num_gallery, memory_budget_mb)
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise EvaluationInputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    device = resolve_device(device)
    distance_fn = _as_chunk_fn(distance, num_query, num_gallery)
    # Chunk functions that guarantee finite output (normalised feature distances) skip the check.
    check_finite = not getattr(distance_fn, "output_is_finite", False)

    gallery = _GalleryByPid.build(g_pid_t.to(device), g_cam_t.to(device))
    q_pid_t, q_cam_t = q_pid_t.to(device), q_cam_t.to(device)
    cmc_len = min(max_rank, num_gallery)
    first_hit_counts = torch.zeros(cmc_len + 1, dtype=torch.long, device=device)
    query_ap = np.full(num_query, np.nan)
    query_inp = np.full(num_query, np.nan)
    for start in range(0, num_query, chunk_size):
        end = min(start + chunk_size, num_query)
        dist = _checked_chunk(distance_fn(start, end), start, end, num_gallery, check_finite).to(device)
        num_pos, pos_ranks = _positive_ranks(dist, q_pid_t[start:end], q_cam_t[start:end], gallery)
        del dist
        ap, inp, first = _query_scores(num_pos, pos_ranks)
        query_ap[start:end] = ap.cpu().numpy()
        query_inp[start:end] = inp.cpu().numpy()
        first_hit_counts += torch.bincount(first[num_pos > 0].clamp(max=cmc_len), minlength=cmc_len + 1)

    valid = ~np.isnan(query_ap)
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise EvaluationInputError(
            f"no valid query: none of the {num_query} queries has a gallery item with the same pid "
            "from a different camera (same-pid-same-camera items are removed); check that query and "
            "gallery camera ids differ for positives"
        )
    cmc = np.cumsum(first_hit_counts[:cmc_len].cpu().numpy()) / num_valid
    return RankResult(
        cmc=cmc,
        mAP=float(np.mean(query_ap[valid])),
        mINP=float(np.mean(query_inp[valid])),
        num_valid_queries=num_valid,
        num_queries=num_query,
        num_gallery=num_gallery,
        chunk_size=chunk_size,
        query_ap=query_ap,
        query_inp=query_inp,
    )


class _GalleryByPid(NamedTuple):
    """Gallery indices grouped by pid (a CSR layout), so a query's same-pid items are found without
    scanning the whole gallery."""

    pids: torch.Tensor  # (G,) gallery pids
    camids: torch.Tensor  # (G,) gallery camids
    order: torch.Tensor  # (G,) gallery indices sorted by pid, index ascending within a pid
    unique_pids: torch.Tensor  # (U,) sorted
    starts: torch.Tensor  # (U,) offset of each pid's run in ``order``
    counts: torch.Tensor  # (U,) length of each pid's run

    @classmethod
    def build(cls, pids: torch.Tensor, camids: torch.Tensor) -> "_GalleryByPid":
        order = torch.sort(pids, stable=True).indices
        unique_pids, counts = torch.unique_consecutive(pids[order], return_counts=True)
        return cls(pids, camids, order, unique_pids, torch.cumsum(counts, 0) - counts, counts)

    def positives(self, q_pids: torch.Tensor, q_camids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gallery indices (C, P) of each query's positives (same pid, other camera), ascending and
        padded with ``G``, and their number per query (C,)."""
        num_gallery = self.order.numel()
        slot = torch.searchsorted(self.unique_pids, q_pids).clamp_(max=self.unique_pids.numel() - 1)
        found = self.unique_pids[slot] == q_pids
        run_length = torch.where(found, self.counts[slot], 0)
        offsets = torch.arange(int(run_length.max()), device=q_pids.device).unsqueeze(0)
        in_run = offsets < run_length.unsqueeze(1)
        cols = self.order[(self.starts[slot].unsqueeze(1) + offsets).clamp_(max=num_gallery - 1)]
        is_positive = in_run & (self.camids[cols] != q_camids.unsqueeze(1))
        return cols.masked_fill_(~is_positive, num_gallery), is_positive.sum(1)


def _positive_ranks(
    dist: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor, gallery: _GalleryByPid
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each query's positives in its kept ranking.

    Returns ``num_pos`` (C,) and ``ranks`` (C, max_pos): ``ranks[i, k]`` is the 0-based position of
    the ``k``-th best positive of query ``i`` after same-pid-same-camera removal (valid for
    ``k < num_pos[i]``). Position of positive ``k`` = ``k`` + the number of negatives (other pids)
    ranked before it, so only negatives that rank before the row's last positive ("relevant" ones)
    are located.
    """
    num_rows, num_gallery = dist.shape
    device = dist.device
    pos_cols, num_pos = gallery.positives(q_pids, q_camids)
    max_pos = int(num_pos.max()) if num_rows else 0
    if max_pos == 0:
        return num_pos, torch.zeros(num_rows, 0, dtype=torch.long, device=device)

    # Each row's positives sorted by (distance, gallery index), padded with +inf / index G: the
    # columns ascend, so a stable sort breaks distance ties by gallery index. One extra padding
    # column keeps every search result (<= max_pos) a valid column.
    pos_cols = torch.nn.functional.pad(pos_cols, (0, 1), value=num_gallery)
    pos_dist = dist.gather(1, pos_cols.clamp(max=num_gallery - 1))
    pos_dist.masked_fill_(pos_cols == num_gallery, float("inf"))
    pos_dist, order = torch.sort(pos_dist, dim=1, stable=True)
    pos_index = pos_cols.gather(1, order)
    pos_dist, pos_index = pos_dist[:, : max_pos + 1].contiguous(), pos_index[:, : max_pos + 1].contiguous()

    # Items beyond the row's last positive precede no positive: leave them out.
    last_pos = pos_dist.gather(1, (num_pos - 1).clamp(min=0).unsqueeze(1))
    last_pos.masked_fill_((num_pos == 0).unsqueeze(1), float("-inf"))
    candidate = dist <= last_pos
    num_candidates = int(torch.count_nonzero(candidate))
    if _use_compact_search(num_candidates, max_pos, num_rows * num_gallery):
        counts = _count_compact(candidate, dist, q_pids, gallery.pids, pos_dist, pos_index)
    else:
        counts = _count_dense(candidate, dist, q_pids, gallery.pids, pos_dist, pos_index)
    negatives_before = counts[:, :max_pos].cumsum(1)  # [i, k]: negatives ranked before positive k
    ranks = torch.arange(max_pos, device=device).unsqueeze(0) + negatives_before
    return num_pos, ranks


# None: choose per chunk; True/False force one search strategy (tests cover both).
_FORCE_COMPACT_SEARCH: bool | None = None


def _use_compact_search(num_relevant: int, max_pos: int, chunk_elements: int) -> bool:
    """Compact search gathers each relevant negative's row of positives: cheaper than searching
    whole rows while that gather is no bigger than the chunk itself (which also bounds memory)."""
    if _FORCE_COMPACT_SEARCH is not None:
        return _FORCE_COMPACT_SEARCH
    return num_relevant * (max_pos + 1) <= chunk_elements


def _count_compact(
    candidate: torch.Tensor,
    dist: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    pos_dist: torch.Tensor,
    pos_index: torch.Tensor,
) -> torch.Tensor:
    """``counts[i, b]`` = negatives of row ``i`` among the candidates with ``b`` positives ranked
    before them, locating each candidate individually."""
    num_rows, width = pos_dist.shape
    rows, cols = candidate.nonzero(as_tuple=True)
    negative = g_pids[cols] != q_pids[rows]  # drops the positives and the removed items
    rows, cols = rows[negative], cols[negative]
    values = dist[rows, cols]
    before = torch.searchsorted(pos_dist[rows], values.unsqueeze(1)).squeeze(1)
    tie = pos_dist[rows, before] == values
    if bool(tie.any()):
        tied = tie.nonzero().squeeze(1)
        before[tied] = _tie_adjusted(
            rows[tied], cols[tied], values[tied], before[tied], pos_dist, pos_index, dist.numel()
        )
    return torch.bincount(rows * width + before, minlength=num_rows * width).view(num_rows, width)


def _count_dense(
    candidate: torch.Tensor,
    dist: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    pos_dist: torch.Tensor,
    pos_index: torch.Tensor,
) -> torch.Tensor:
    """Same as :func:`_count_compact`, searching every gallery item of the chunk at once (faster
    when most items are candidates)."""
    num_rows, width = pos_dist.shape
    relevant = candidate.logical_and_(g_pids.unsqueeze(0) != q_pids.unsqueeze(1))
    before = torch.searchsorted(pos_dist, dist)  # positives with a strictly smaller distance
    tie = pos_dist.gather(1, before).eq_(dist).logical_and_(relevant)
    if bool(tie.any()):
        rows, cols = tie.nonzero(as_tuple=True)
        before[rows, cols] = _tie_adjusted(
            rows, cols, dist[rows, cols], before[rows, cols], pos_dist, pos_index, dist.numel()
        )
    del tie
    before.masked_fill_(relevant.logical_not_(), width - 1)  # slot width-1 is never read
    counts = torch.zeros(num_rows, width, dtype=torch.long, device=dist.device)
    return counts.scatter_add_(1, before, torch.ones_like(before))


def _tie_adjusted(
    rows: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    left: torch.Tensor,
    pos_dist: torch.Tensor,
    pos_index: torch.Tensor,
    budget: int,
) -> torch.Tensor:
    """Positives ranked before negatives that tie with some positive's distance.

    ``left`` counts the positives with a strictly smaller distance; the tie rule (stable sort by
    distance, then gallery index) adds the tied positives with a smaller gallery index. Tied
    positives of a row are contiguous in ``pos_dist`` and ordered by gallery index. Processed in
    batches of at most ``budget`` (ties x positives) elements.
    """
    width = pos_dist.shape[1]
    batch = max(1, budget // width)
    result = torch.empty_like(left)
    for start in range(0, rows.numel(), batch):
        part = slice(start, start + batch)
        r, c, lo = rows[part], cols[part], left[part]
        num_tied = torch.searchsorted(pos_dist[r], values[part].unsqueeze(1), side="right").squeeze(1) - lo
        offsets = torch.arange(int(num_tied.max()), device=pos_dist.device)
        candidates = pos_index[r.unsqueeze(1), (lo.unsqueeze(1) + offsets).clamp(max=width - 1)]
        earlier = (candidates < c.unsqueeze(1)) & (offsets < num_tied.unsqueeze(1))
        result[part] = lo + earlier.sum(1)
    return result


def _query_scores(num_pos: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AP, INP (NaN for queries without positives) and first-positive position per query."""
    valid = num_pos > 0
    if ranks.shape[1] == 0:
        nan = torch.full(num_pos.shape, float("nan"), dtype=torch.float64, device=num_pos.device)
        return nan, nan.clone(), torch.zeros_like(num_pos)
    k = torch.arange(ranks.shape[1], device=ranks.device).unsqueeze(0)
    precision = (k + 1).double() / (ranks + 1).double()  # precision at each positive
    precision.masked_fill_(k >= num_pos.unsqueeze(1), 0.0)
    ap = precision.sum(1) / num_pos.clamp(min=1)
    last = ranks.gather(1, (num_pos - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    inp = num_pos.double() / (last + 1).double()
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=ap.device)
    return torch.where(valid, ap, nan), torch.where(valid, inp, nan), ranks[:, 0]


def _as_chunk_fn(
    distance: DistanceChunkFn | torch.Tensor | np.ndarray, num_query: int, num_gallery: int
) -> Callable[[int, int], torch.Tensor]:
    if isinstance(distance, np.ndarray):
        distance = torch.from_numpy(distance)
    if isinstance(distance, torch.Tensor):
        if tuple(distance.shape) != (num_query, num_gallery):
            raise EvaluationInputError(
                f"distance matrix has shape {tuple(distance.shape)}, expected (num_query, num_gallery) = "
                f"({num_query}, {num_gallery}) from the pid arrays"
            )
        matrix = distance
        return lambda start, end: matrix[start:end]
    if callable(distance):
        return distance
    raise EvaluationInputError(
        "distance must be a (Q, G) tensor/array or a callable (q_start, q_end) -> Tensor, "
        f"got {type(distance).__name__}"
    )


def _checked_chunk(
    chunk: torch.Tensor, start: int, end: int, num_gallery: int, check_finite: bool
) -> torch.Tensor:
    if isinstance(chunk, np.ndarray):
        chunk = torch.from_numpy(chunk)
    if not isinstance(chunk, torch.Tensor) or not chunk.is_floating_point():
        raise EvaluationInputError(
            f"distance rows {start}:{end}: expected a floating-point tensor, got "
            f"{getattr(chunk, 'dtype', type(chunk).__name__)}"
        )
    if tuple(chunk.shape) != (end - start, num_gallery):
        raise EvaluationInputError(
            f"distance rows {start}:{end}: expected shape ({end - start}, {num_gallery}), got {tuple(chunk.shape)}"
        )
    # A sum is one cheap pass and is non-finite whenever an element is (or, rarely, on overflow).
    if check_finite and not bool(torch.isfinite(chunk.sum())) and not bool(torch.isfinite(chunk).all()):
        raise EvaluationInputError(f"distance rows {start}:{end}: contains NaN or Inf values")
    if chunk.dtype in (torch.float16, torch.bfloat16):
        chunk = chunk.float()  # exact widening; searchsorted wants float32/64
    return chunk.contiguous()  # searchsorted wants contiguous rows


def _as_id_tensor(values: Sequence[int] | np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """1-D, non-empty, integer ids as an int64 tensor; anything else is an EvaluationInputError."""
    if not isinstance(values, torch.Tensor):
        values = np.asarray(values)
    if values.ndim != 1:
        raise EvaluationInputError(f"{name}: expected a 1-D array, got shape {tuple(values.shape)}")
    if len(values) == 0:
        raise EvaluationInputError(f"{name}: empty (need at least one item)")
    if isinstance(values, torch.Tensor):
        bad_dtype = values.is_floating_point() or values.is_complex() or values.dtype == torch.bool
    else:
        bad_dtype = values.dtype.kind not in "iu"
    if bad_dtype:
        raise EvaluationInputError(f"{name}: expected integer ids, got dtype {values.dtype}")
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values.astype(np.int64, copy=False))
    return values.long()


def _check_length(values: Sequence[int] | np.ndarray | torch.Tensor, expected: int, name: str, other: str) -> None:
    if len(values) != expected:
        raise EvaluationInputError(f"{name} has {len(values)} entries but {other} has {expected}")
