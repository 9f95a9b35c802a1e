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
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterable
from types import FrameType

import torch

from passreid import dist

__all__ = ["PREEMPTION_SIGNALS", "PreemptionGuard", "requeue_current_job"]

logger = logging.getLogger(__name__)

#: The signals that mean "you are about to be stopped": SLURM's ``--signal`` default choice and SIGTERM.
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionGuard:
    """Records pre-emption signals; the training loop polls :meth:`requested` between iterations."""

    def __init__(self) -> None:
        self.signal_received: int | None = None
        self._previous: dict[int, object] = {}

    @classmethod
    def install(cls, signals: Iterable[int] = PREEMPTION_SIGNALS) -> PreemptionGuard:
        """A guard with handlers for ``signals`` (only possible in the main thread; elsewhere the guard
        stays inert and says so in the log)."""
        guard = cls()
        if threading.current_thread() is not threading.main_thread():
            logger.warning("pre-emption signals are not handled: the training loop is not in the main thread")
            return guard
        for signum in signals:
            guard._previous[signum] = signal.signal(signum, guard._handle)
        return guard

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_received is None:
            logger.warning("received %s: will write a checkpoint and stop after the current iteration",
                           signal.Signals(signum).name)
        self.signal_received = signum

    def requested(self) -> bool:
        """Whether any rank received a pre-emption signal (a collective when ``world_size > 1``)."""
        local = self.signal_received is not None
        if dist.get_world_size() == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=_collective_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


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
