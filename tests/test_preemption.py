"""Pre-emption: a SIGUSR1/SIGTERM during training writes the checkpoint, stops, and the resumed run continues
exactly (the real-SLURM requeue path is tested with the launch scripts)."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from passreid.config import load_config
from passreid.engine import Checkpointer, PreemptionGuard, requeue_current_job
from passreid.finetune import FinetuneConfig, run_training
from passreid.finetune.trainer import FinetuneTrainer

REPO = Path(__file__).resolve().parents[1]
COMMON = ["model.img_size=[64,32]", "train.log_period=1", "data.test_batch_size=256", "train.epochs=4",
          "eval.period=100", "train.checkpoint_period=100"]


def _cfg(output_dir: Path, world: Path, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo.yaml",
                       [f"train.output_dir={output_dir}", f"data.root={world}/market", *COMMON, *overrides])


def _train_losses(output_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_guard_records_the_signal_and_restores_the_previous_handler(signum):
    previous = signal.getsignal(signum)
    guard = PreemptionGuard.install()
    assert not guard.requested()
    os.kill(os.getpid(), signum)
    assert guard.requested() and guard.signal_received == signum
    guard.uninstall()
    assert signal.getsignal(signum) is previous


def test_the_handler_logs_nothing_itself_and_its_line_comes_at_the_next_poll(monkeypatch):
    # A handler interrupting a logging call that writes the same file made logging fail ("reentrant call"):
    # the handler queues its line, the loop's next poll logs it.
    from passreid.engine import preemption

    lines = []
    monkeypatch.setattr(preemption.logger, "warning", lambda message, *args: lines.append(message % args))
    guard = PreemptionGuard.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.signal_received == signal.SIGUSR1 and lines == []  # recorded, nothing logged by the handler
        assert guard.requested()
        assert len(lines) == 1 and lines[0].startswith("received SIGUSR1: will write a checkpoint and stop")
        assert guard.requested() and len(lines) == 1  # logged once
    finally:
        guard.uninstall()


def test_requeue_is_a_no_op_outside_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_current_job() is False


def test_signal_mid_training_checkpoints_and_the_resumed_run_continues_exactly(tmp_path, synthetic_world,
                                                                              monkeypatch):
    reference_dir, preempted_dir = tmp_path / "reference", tmp_path / "preempted"
    run_training(_cfg(reference_dir, synthetic_world, "train.max_iters=6"), resume=False)

    original_step = FinetuneTrainer._step

    def step_then_signal(self, batch):  # the scheduler's signal arrives during iteration 3
        values = original_step(self, batch)
        if self.iteration == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return values

    monkeypatch.setattr(FinetuneTrainer, "_step", step_then_signal)
    stopped = run_training(_cfg(preempted_dir, synthetic_world, "train.max_iters=6"), resume=False)
    assert stopped.preempted and stopped.iterations == 3 and stopped.final_model is None
    assert Checkpointer(preempted_dir).load()["iteration"] == 3
    assert not (preempted_dir / "model_final.pth").exists()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers are put back after the run

    monkeypatch.setattr(FinetuneTrainer, "_step", original_step)
    resumed = run_training(_cfg(preempted_dir, synthetic_world, "train.max_iters=6"), resume=True)
    assert not resumed.preempted and resumed.iterations == 6
    expected, continued = _train_losses(reference_dir), _train_losses(preempted_dir)
    assert sorted(continued) == list(range(1, 7))
    for step in range(1, 7):
        assert continued[step] == pytest.approx(expected[step], rel=1e-6), step
