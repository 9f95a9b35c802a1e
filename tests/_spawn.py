"""Start test worker processes (spawned, one per rank), wait for them with a deadline, and leave their process
group cleanly; a process group of one in the test process itself."""
from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def start_workers(worker: Callable, args: tuple, nprocs: int = 2) -> mp.ProcessContext:
    """``worker(rank, *args)`` in ``nprocs`` spawned processes; returns at once."""
    return mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")


def wait_for_workers(context: mp.ProcessContext, timeout_s: float, what: str) -> None:
    """Join the workers (a worker's exception is re-raised); fail the test after ``timeout_s``; never leave one
    running."""
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not finish within {timeout_s:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()


def leave_group_after(body: Callable[[], None]) -> None:
    """``body()``, then leave the process group, with body's objects already freed: a DDP wrapper still alive
    would keep the group, and a group alive at the interpreter's exit can abort the worker (SIGABRT). Raises when
    the group's threads outlive it."""
    from passreid import dist

    try:
        body()
    finally:
        dist.destroy()
    left = group_threads()
    if left:
        raise RuntimeError(f"the process group's threads outlived dist.destroy(): {left}")


def group_threads() -> list[str]:
    """This process's gloo and TCP-store threads (by their native names; none listed where /proc is absent)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = ((task / "comm").read_text().strip() for task in tasks.iterdir())
    return sorted(name for name in names if "gloo" in name or "tcpstore" in name)


@contextlib.contextmanager
def process_group_of_one(backend: str, store_file: Path) -> Iterator[None]:
    """A real ``backend`` process group of this process alone, left on exit. torch._dynamo is imported first, as
    passreid.dist.init_distributed does: imported later (DDP does), it would keep the group and its threads alive
    until pytest's exit."""
    importlib.import_module("torch._dynamo")
    dist.init_process_group(backend, init_method=f"file://{store_file}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
