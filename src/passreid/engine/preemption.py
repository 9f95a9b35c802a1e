"""Pre-emption: turn the scheduler's warning signal into "checkpoint now and stop", then requeue.

SLURM sends ``SIGUSR1`` (``#SBATCH --signal=USR1@<seconds>``) or ``SIGTERM`` (pre-emption, ``scancel``)
some time before it kills a job. A Python signal handler must not write checkpoints itself (it runs
between two bytecodes of whatever the loop was doing, possibly in the middle of an optimizer step), so
:class:`PreemptionGuard` only records the signal; the training loop asks :meth:`PreemptionGuard.requested`
between iterations, writes its checkpoint, and returns. The entry point then calls
:func:`requeue_current_job` so SLURM starts the job again, and the new job auto-resumes from the
checkpoint::

    guard = PreemptionGuard.install()
    for batch in loader:
        step(batch)
        if guard.requested():          # a collective under DDP: every rank stops at the same iteration
            save_checkpoint()
            return "preempted"

Under DDP every rank calls :meth:`~PreemptionGuard.requested` at the same iteration; the flag is
all-reduced (max) so all ranks stop together even when only some of them received the signal.

DataLoader workers. SLURM signals every process of the job step, workers included, and PyTorch's
workers die on a SIGTERM that does not come from their parent; the main process then raises "DataLoader
worker ... is killed by signal" from wherever it is, before it can write its checkpoint. The stages
therefore build their loaders with :class:`PreemptibleDataLoader`: its workers ignore the pre-emption
signals (the main process alone decides when to stop), the signals are blocked while the workers are
forked (no window in which a new worker still has PyTorch's handler), and once a pre-emption signal has
arrived a worker that dies anyway no longer interrupts the main process mid-step: the loader reports it
at its next fetch, which the loops treat as "stop here". Because the workers ignore SIGTERM, the process
ends them itself when a batch cannot be fetched and, as a last resort, kills the ones still alive at exit
(``multiprocessing`` stops daemonic children at exit with a SIGTERM, then waits for them forever).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any

import torch
from torch.utils.data import DataLoader

from passreid import dist

__all__ = ["PREEMPTION_SIGNALS", "PreemptibleDataLoader", "PreemptionGuard", "batches_until_preempted",
           "preemption_guard", "preemption_signal_received", "requeue_current_job"]

logger = logging.getLogger(__name__)

#: The signals that mean "you are about to be stopped": SLURM's ``--signal`` default choice and SIGTERM.
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

# Set by the installed guard's handler; read by the SIGCHLD wrapper below (a signal handler cannot be
# handed the guard, and one process runs one training loop at a time).
_signal_received = threading.Event()

# Lines of the signal handlers, logged at the next safe point. A handler runs between two bytecodes of the main
# thread, possibly inside a logging call writing the same file: logging there fails ("reentrant call inside
# BufferedWriter" and a "--- Logging error ---" traceback in the job log). deque.append is safe there.
_handler_notes: collections.deque[str] = collections.deque()


def _note(message: str) -> None:
    """From a signal handler: queue ``message`` (with the time it happened) for :func:`_log_handler_notes`."""
    _handler_notes.append(f"{message} (at {time.strftime('%H:%M:%S')})")


def _log_handler_notes() -> None:
    """Log what the signal handlers queued; called where the training loop polls or stops."""
    while _handler_notes:
        logger.warning(_handler_notes.popleft())


def preemption_signal_received() -> bool:
    """Whether the installed :class:`PreemptionGuard` of this process has recorded a signal."""
    return _signal_received.is_set()


class PreemptionGuard:
    """Records pre-emption signals; the training loop polls :meth:`requested` between iterations.

    One guard per process: :meth:`install` while a guard is installed returns that guard (a stage installs
    it before its set-up, so a signal during data indexing or model loading is not lost, and its loop
    polls the same guard); each :meth:`install` is paired with an :meth:`uninstall`, the last of which
    puts the previous handlers back.
    """

    _installed: PreemptionGuard | None = None

    def __init__(self) -> None:
        self.signal_received: int | None = None
        self._previous: dict[int, object] = {}
        self._installs = 0

    @classmethod
    def install(cls, signals: Iterable[int] = PREEMPTION_SIGNALS) -> PreemptionGuard:
        """The process's guard, with handlers for ``signals`` (only possible in the main thread; elsewhere
        the guard stays inert and says so in the log)."""
        if cls._installed is not None:
            cls._installed._installs += 1
            return cls._installed
        guard = cls()
        if threading.current_thread() is not threading.main_thread():
            logger.warning("pre-emption signals are not handled: the training loop is not in the main thread")
            return guard
        _signal_received.clear()
        for signum in signals:
            guard._previous[signum] = signal.signal(signum, guard._handle)
        guard._installs = 1
        cls._installed = guard
        return guard

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_received is None:
            _note(f"received {signal.Signals(signum).name}: will write a checkpoint and stop after the current "
                  "iteration")
        self.signal_received = signum
        _signal_received.set()

    def requested(self) -> bool:
        """Whether any rank received a pre-emption signal (a collective when ``world_size > 1``)."""
        _log_handler_notes()
        local = self.signal_received is not None
        if dist.get_world_size() == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=_collective_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def uninstall(self) -> None:
        """Undo one :meth:`install`; the last one puts the previous handlers back."""
        _log_handler_notes()
        if self._installs > 1:
            self._installs -= 1
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self._installs = 0
        if PreemptionGuard._installed is self:
            PreemptionGuard._installed = None
            _signal_received.clear()


@contextlib.contextmanager
def preemption_guard() -> Iterator[PreemptionGuard]:
    """The process's :class:`PreemptionGuard`, installed for the block (see :meth:`PreemptionGuard.install`)."""
    guard = PreemptionGuard.install()
    try:
        yield guard
    finally:
        guard.uninstall()


class _WorkerInit:
    """``worker_init_fn`` of :class:`PreemptibleDataLoader`: hand the pre-emption signals to the main
    process, then run the caller's own init function (a class, not a closure: spawned workers pickle it)."""

    def __init__(self, user_init_fn: Callable[[int], None] | None) -> None:
        self.user_init_fn = user_init_fn

    def __call__(self, worker_id: int) -> None:
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)  # replaces PyTorch's worker SIGTERM handler
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)  # blocked by the parent at fork
        if self.user_init_fn is not None:
            self.user_init_fn(worker_id)


class _DeferWorkerFailures:
    """SIGCHLD handler wrapped around PyTorch's: after a pre-emption signal a dying worker must not raise
    in the middle of an optimizer step or a checkpoint write; the loader still reports it at its next
    fetch, where stopping is safe."""

    def __init__(self, inner: Callable[[int, FrameType | None], Any]) -> None:
        self.inner = inner

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if _signal_received.is_set():
            _note("a data-loading worker ended after the pre-emption signal; stopping as planned")
            return
        self.inner(signum, frame)


class PreemptibleDataLoader(DataLoader):
    """A :class:`torch.utils.data.DataLoader` whose workers leave SIGTERM / SIGUSR1 to the main process.

    Takes the DataLoader's arguments; ``worker_init_fn`` still runs in every worker, after the signal
    set-up. Every loader a training stage iterates (training and evaluation) is one of these.
    """

    def __init__(self, *args: Any, worker_init_fn: Callable[[int], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, worker_init_fn=_WorkerInit(worker_init_fn), **kwargs)

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
        try:
            iterator = super().__iter__()  # forks the workers: they start with the signals blocked
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a signal that arrived meanwhile is delivered now
        _wrap_sigchld_handler()
        _kill_workers_left_at_exit()
        return iterator


@functools.cache
def _kill_workers_left_at_exit() -> None:
    """Registers (once, after multiprocessing's own exit hook, so it runs first) a hook that kills the
    daemonic children still alive when the interpreter exits: workers that ignore SIGTERM would otherwise
    make multiprocessing's exit hook wait for them forever (e.g. after an error left an iterator alive)."""

    def kill_daemonic_children() -> None:
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()

    atexit.register(kill_daemonic_children)


def batches_until_preempted(loader: Iterable[Any]) -> Iterator[Any]:
    """The batches of ``loader``; when fetching one fails after a pre-emption signal (a worker that died
    during the shutdown), the iteration ends there instead of raising: nothing of that batch was used, so
    the checkpoint the loop writes next is exact."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as error:
            if not _signal_received.is_set():
                _shut_down_workers(iterator)
                raise
            _log_handler_notes()
            logger.warning("data loading failed after the pre-emption signal (%s); stopping here", error)
            return
        except BaseException:
            _shut_down_workers(iterator)  # the error's traceback keeps the iterator, and its workers, alive
            raise
        yield batch


def _shut_down_workers(iterator: Iterator[Any]) -> None:
    """End a multi-process DataLoader iterator's workers now (what its ``__del__`` does)."""
    shut_down = getattr(iterator, "_shutdown_workers", None)
    if shut_down is not None:
        shut_down()


def _wrap_sigchld_handler() -> None:
    """Wrap the SIGCHLD handler PyTorch installs with the first multi-process iterator (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGCHLD)
    if callable(current) and not isinstance(current, _DeferWorkerFailures):
        signal.signal(signal.SIGCHLD, _DeferWorkerFailures(current))


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def requeue_current_job() -> bool:
    """Ask SLURM to requeue this job (``scontrol requeue $SLURM_JOB_ID``); False outside SLURM.

    Called once, by rank 0, after the checkpoint is on disk. Job arrays are requeued task by task
    (``SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID``). The job must have been submitted requeueable
    (``#SBATCH --requeue``; the launch scripts do).
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        job_id = f"{array_job}_{array_task}"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        logger.error("cannot requeue SLURM job %s: scontrol is not on PATH", job_id)
        return False
    completed = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        logger.error("scontrol requeue %s failed (exit %d): %s", job_id, completed.returncode,
                     completed.stderr.strip())
        return False
    logger.info("requeued SLURM job %s; it resumes from the checkpoint when it starts again", job_id)
    return True
