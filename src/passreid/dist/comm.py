"""Process-group set-up and the few collectives the stages need.

Every helper also works without a process group (one process): ranks are 0, collectives
return their input. Under NCCL, CPU tensors are moved to this process's GPU for the
collective and the result comes back on the caller's device.
"""
from __future__ import annotations

import datetime
import gc
import importlib
import os
from typing import Any

import torch
import torch.distributed as dist

from .env import DistEnv, resolve_dist_env

_current_env: DistEnv | None = None
_MAX_ROW_DIMS = 6
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)


def init_distributed(env: DistEnv | None = None, backend: str | None = None,
                     timeout: datetime.timedelta | None = None) -> DistEnv:
    """Join the process group described by ``env`` (default: :func:`resolve_dist_env`).

    Backend: ``"nccl"`` when CUDA is available, else ``"gloo"``; ``backend`` overrides. With
    NCCL the current CUDA device is set to ``env.local_rank`` first. ``MASTER_ADDR`` and
    ``MASTER_PORT`` are exported so that libraries reading them agree. For ``world_size == 1``
    no group is created (nothing to talk to) but the helpers below still answer.
    Calling it again with the same env is a no-op; with a different one it raises.
    """
    global _current_env
    env = env if env is not None else resolve_dist_env()
    if dist.is_available() and dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
            raise RuntimeError(f"a process group (rank {dist.get_rank()} of {dist.get_world_size()}) "
                               f"already exists; cannot switch to rank {env.rank} of {env.world_size}")
        _current_env = env
        return env
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        _select_cuda_device(env.local_rank)
    _current_env = env
    if env.world_size == 1:
        return env
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    os.environ["MASTER_ADDR"] = env.master_addr
    os.environ["MASTER_PORT"] = str(env.master_port)
    host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr  # IPv6
    # torch._dynamo (imported by DDP on first use) keeps references to the process group that exists when it is
    # imported, so destroy() could not free that group: its gloo threads then ran into the interpreter's exit,
    # which now and then aborted a finished rank (SIGABRT, "terminate called without an active exception").
    importlib.import_module("torch._dynamo")
    kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(backend=backend, init_method=f"tcp://{host}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size, **kwargs)
    return env


def destroy() -> None:
    """Leave the process group (if any) and free it, which ends its communication threads; the helpers fall back
    to single-process answers."""
    global _current_env
    if _is_initialized():
        gc.collect()  # a DDP wrapper left in a reference cycle would keep the group (and its threads) alive
        dist.destroy_process_group()
    _current_env = None


def get_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if _is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return dist.get_world_size() if _is_initialized() else 1


def get_local_rank() -> int:
    """Rank within this node, from the env passed to :func:`init_distributed` (else 0)."""
    return _current_env.local_rank if _current_env is not None else 0


def is_main_process() -> bool:
    """True on global rank 0: the process that logs, evaluates and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait until every process gets here (no-op for one process)."""
    if _is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of ``tensor`` over all processes, as a new tensor (input unchanged).

    Meant for metrics and statistics: the result carries no autograd history.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"all_reduce_mean expects a tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"all_reduce_mean expects a floating-point tensor, got {tensor.dtype}; "
                        f"cast counts with .float() first")
    result = tensor.detach().clone()
    if get_world_size() == 1:
        return result
    work = result.to(_comm_device())
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return (work / get_world_size()).to(tensor.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects only)."""
    if get_world_size() == 1:
        return obj
    if not 0 <= src < get_world_size():
        raise ValueError(f"src must be a rank in [0, {get_world_size()}), got {src}")
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_by_index(features: torch.Tensor, indices: torch.Tensor, total: int, *,
                        allow_duplicates: bool = False) -> torch.Tensor:
    """Gather rows computed on different processes into one ``(total, ...)`` tensor by index.

    Each process passes the rows it computed, ``features[i]`` belonging to sample
    ``indices[i]`` (global dataset positions). Shards may have different lengths (sizes are
    exchanged first and shorter shards padded). Every process returns the full tensor with
    row ``j`` = the features of sample ``j``, on the caller's device.

    Args:
        features: ``(n, *dims)`` rows of this process; ``dims`` must match across processes.
        indices: ``(n,)`` integer sample positions in ``[0, total)``.
        total: number of samples in the whole dataset.
        allow_duplicates: accept a sample computed more than once (a padding sampler repeats
            samples to even out shards); one of the copies is kept.
    Raises:
        ValueError on every process (so none is left waiting) when some process passed
        mismatched shapes or out-of-range indices, or when samples are missing or duplicated.
    """
    problem = _local_gather_problem(features, indices, total)
    if get_world_size() == 1:
        if problem:
            raise ValueError(problem)
        return _scatter_rows(features, indices.long(), total, allow_duplicates, features.device)

    device = _comm_device()
    row_dims = () if problem else tuple(features.shape[1:])
    row_size = 1
    for dim in row_dims:
        row_size *= dim
    dtype_code = -1 if problem else _dtype_code(features.dtype)
    padded_dims = [*row_dims, *([0] * (_MAX_ROW_DIMS - len(row_dims)))]
    meta = torch.tensor([0 if problem else features.shape[0], int(bool(problem)), dtype_code,
                         len(row_dims), *padded_dims], dtype=torch.long, device=device)
    metas = [torch.empty_like(meta) for _ in range(get_world_size())]
    dist.all_gather(metas, meta)
    metas_cpu = torch.stack(metas).cpu()
    _raise_if_inconsistent(metas_cpu, problem)

    counts = metas_cpu[:, 0].tolist()
    max_rows = max(counts)
    flat = features.detach().reshape(features.shape[0], row_size).to(device)
    padded_rows = torch.zeros(max_rows, row_size, dtype=flat.dtype, device=device)
    padded_rows[: flat.shape[0]] = flat
    padded_index = torch.full((max_rows,), -1, dtype=torch.long, device=device)
    padded_index[: indices.numel()] = indices.to(device=device, dtype=torch.long)

    gathered_rows = [torch.empty_like(padded_rows) for _ in counts]
    gathered_index = [torch.empty_like(padded_index) for _ in counts]
    dist.all_gather(gathered_rows, padded_rows)
    dist.all_gather(gathered_index, padded_index)

    rows = torch.cat([g[:n] for g, n in zip(gathered_rows, counts)])
    index = torch.cat([g[:n] for g, n in zip(gathered_index, counts)])
    out = _scatter_rows(rows, index, total, allow_duplicates, device)
    return out.reshape(total, *row_dims).to(features.device)


# ----------------------------------------------------------------------------------------------


def _is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device() -> torch.device:
    """Where collective buffers must live: the current GPU under NCCL, else the CPU."""
    if _is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _select_cuda_device(local_rank: int) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("backend 'nccl' needs CUDA, but torch.cuda.is_available() is False")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(f"local rank {local_rank} has no GPU: only {count} visible "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    torch.cuda.set_device(local_rank)


def _local_gather_problem(features: torch.Tensor, indices: torch.Tensor, total: int) -> str:
    """Why this process's inputs are unusable ('' when they are fine)."""
    if not isinstance(features, torch.Tensor) or not isinstance(indices, torch.Tensor):
        return "features and indices must be tensors"
    if features.dim() < 1:
        return f"features must have a sample dimension, got shape {tuple(features.shape)}"
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        return f"indices must be a 1-D integer tensor, got shape {tuple(indices.shape)} {indices.dtype}"
    if indices.numel() != features.shape[0]:
        return (f"features has {features.shape[0]} rows but indices has {indices.numel()} "
                f"entries")
    if features.dim() - 1 > _MAX_ROW_DIMS:
        return f"features may have at most {_MAX_ROW_DIMS} dimensions after the sample one"
    if _dtype_code(features.dtype) < 0:
        return f"unsupported feature dtype {features.dtype}; use one of {_DTYPES}"
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        return f"total must be a non-negative int, got {total!r}"
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= total):
        return (f"indices must lie in [0, {total}), got range "
                f"[{int(indices.min())}, {int(indices.max())}]")
    return ""


def _raise_if_inconsistent(metas: torch.Tensor, problem: str) -> None:
    """Raise the same error on every rank when any rank's inputs are unusable or mismatched."""
    bad_ranks = torch.nonzero(metas[:, 1]).flatten().tolist()
    if bad_ranks:
        detail = f": {problem}" if problem else " (see the error on that rank)"
        raise ValueError(f"all_gather_by_index: invalid input on rank(s) {bad_ranks}{detail}")
    shapes = {tuple(m[4:4 + int(m[3])].tolist()) for m in metas}
    if len(shapes) > 1:
        raise ValueError(f"all_gather_by_index: feature row shapes differ between ranks: "
                         f"{sorted(shapes)}")
    dtypes = {_DTYPES[int(code)] if code >= 0 else "unsupported" for code in metas[:, 2]}
    if len(dtypes) > 1:
        raise ValueError(f"all_gather_by_index: feature dtypes differ between ranks: "
                         f"{sorted(map(str, dtypes))}")


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def _scatter_rows(rows: torch.Tensor, index: torch.Tensor, total: int, allow_duplicates: bool,
                  device: torch.device) -> torch.Tensor:
    counts = torch.bincount(index.cpu(), minlength=total)
    missing = torch.nonzero(counts == 0).flatten()
    if missing.numel():
        raise ValueError(f"all_gather_by_index: {missing.numel()} of {total} samples were not "
                         f"computed by any rank, e.g. indices {missing[:10].tolist()}")
    repeated = torch.nonzero(counts > 1).flatten()
    if repeated.numel() and not allow_duplicates:
        raise ValueError(f"all_gather_by_index: {repeated.numel()} samples were computed more "
                         f"than once, e.g. indices {repeated[:10].tolist()} "
                         f"(pass allow_duplicates=True for a padding sampler)")
    out = torch.empty((total, *rows.shape[1:]), dtype=rows.dtype, device=device)
    out[index.to(device)] = rows.to(device)
    return out
