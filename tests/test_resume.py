"""Crash-and-resume tests: real processes killed with SIGKILL, then resumed from checkpoint.pth."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from passreid.engine import Checkpointer

TOY_SCRIPT = Path(__file__).with_name("_resume_toy_train.py")
TOTAL_STEPS = 15  # 2.5 epochs of 6 steps
TIMEOUT_S = 120


def _start_toy(output_dir: Path, losses: Path, *extra: str) -> subprocess.Popen[str]:
    command = [
        sys.executable, str(TOY_SCRIPT), "--output-dir", str(output_dir), "--losses", str(losses),
        "--total-steps", str(TOTAL_STEPS), *extra,
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(process: subprocess.Popen[str], expected_returncode: int = 0) -> None:
    try:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == expected_returncode, (process.returncode, stderr)


def _read_losses(path: Path) -> dict[int, float]:
    losses = {}
    for line in path.read_text().splitlines():
        step, value = line.split()
        assert int(step) not in losses, f"step {step} recorded twice in {path}"
        losses[int(step)] = float.fromhex(value)
    return losses


def _run_until_killed(output_dir: Path, losses: Path, kill_after: int, *extra: str) -> None:
    """Run the toy (optionally resuming) until it SIGKILLs itself after saving step ``kill_after``."""
    _wait(_start_toy(output_dir, losses, "--kill-after", str(kill_after), *extra), -signal.SIGKILL)
    assert sorted(_read_losses(losses)) == list(range(1, kill_after + 1))
    state = Checkpointer(output_dir).load()
    assert state is not None and state["iteration"] == kill_after


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(tmp_path: Path) -> None:
    """Killed at an epoch end (step 6), resumed and killed mid-epoch (step 10), resumed to the end;
    the per-step losses equal those of an uninterrupted run (started alongside, in parallel)."""
    run_dir, control_dir, reference_dir = tmp_path / "run", tmp_path / "control", tmp_path / "reference"
    run_dir.mkdir()
    reference_dir.mkdir()
    reference = _start_toy(reference_dir, reference_dir / "losses.txt")

    losses = run_dir / "losses.txt"
    _run_until_killed(run_dir, losses, 6)
    _run_until_killed(run_dir, losses, 10, "--resume")
    shutil.copytree(run_dir, control_dir)
    resumed = _start_toy(run_dir, losses, "--resume")
    # Negative control (so the comparison below can fail): the same resume without the RNG restore.
    control = _start_toy(control_dir, control_dir / "losses.txt", "--resume", "--no-restore-rng")
    for process in (reference, resumed, control):
        _wait(process)

    expected = _read_losses(reference_dir / "losses.txt")
    combined = _read_losses(losses)
    assert sorted(expected) == sorted(combined) == list(range(1, TOTAL_STEPS + 1))
    for step, value in expected.items():
        assert combined[step] == pytest.approx(value, abs=1e-7, rel=0), f"step {step}"
    final = Checkpointer(run_dir).load()
    assert final["iteration"] == TOTAL_STEPS and final["epoch"] == 2 and final["sampler"]["consumed"] == 24

    diverged = _read_losses(control_dir / "losses.txt")
    assert any(abs(diverged[step] - expected[step]) > 1e-6 for step in range(11, TOTAL_STEPS + 1))


_HALF_WRITE_SCRIPT = textwrap.dedent(
    """
    import io, os, signal, sys
    import torch
    from passreid.engine import Checkpointer

    real_save = torch.save

    def save_half_then_die(obj, handle, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_half_then_die
    Checkpointer(sys.argv[1]).save({"iteration": 2, "weights": torch.full((4096,), 2.0)})
    """
)


def test_process_killed_mid_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path)
    good = {"iteration": 1, "weights": torch.ones(4096)}
    checkpointer.save(good)

    died = subprocess.run(
        [sys.executable, "-c", _HALF_WRITE_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert died.returncode == -signal.SIGKILL, (died.returncode, died.stderr)

    leftovers = list(tmp_path.glob(".checkpoint.pth.tmp-*"))
    assert len(leftovers) == 1, "the killed writer should have left exactly one partial temp file"
    with pytest.raises(Exception):  # the partial file really is unreadable
        torch.load(leftovers[0], weights_only=True)

    loaded = checkpointer.load()
    assert loaded["iteration"] == 1 and torch.equal(loaded["weights"], good["weights"])

    newer = {"iteration": 3, "weights": torch.full((4096,), 3.0)}
    checkpointer.save(newer)
    assert not list(tmp_path.glob(".checkpoint.pth.tmp-*")), "the dead writer's temp file should be cleaned"
    loaded = checkpointer.load()
    assert loaded["iteration"] == 3 and torch.equal(loaded["weights"], newer["weights"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pth", "checkpoint.pth"]
    assert torch.load(tmp_path / "checkpoint.prev.pth", weights_only=True)["iteration"] == 1  # the replaced one

