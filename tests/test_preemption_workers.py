"""Pre-emption the way SLURM does it: SIGTERM to every process of the run, DataLoader workers included.

Each stage runs through its entry point in its own process group with two loader workers; the test
signals the whole group mid-run, as pre-emption and a time limit do. The stage must finish its current
iteration, write ``checkpoint.pth`` and exit 0 (no "DataLoader worker ... killed by signal"), and the
resumed run's losses must equal those of an uninterrupted run step by step.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from passreid.config import load_config
from passreid.data.samplers import RandomIdentitySampler, ResumableDistributedSampler, SampleSeeds, SeededSamples
from passreid.engine import PreemptibleDataLoader, preemption_guard

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300

# Tiny runs of each stage (the budgets of tests/test_finetune_train.py, test_usl_train.py and
# test_pretrain_stage.py), long enough that the signal lands mid-run, with two loader workers.
STAGES = {
    "finetune": ("finetune/train.py", "configs/finetune/demo.yaml", [
        "model.img_size=[64,32]", "train.log_period=1", "data.test_batch_size=256", "eval.period=100",
        "train.epochs=4", "train.max_iters=8", "data.num_workers=2", "train.checkpoint_period=100"]),
    "usl": ("usl/train.py", "configs/usl/demo.yaml", ["model.pretrained=none",
        "model.img_size=[64,32]", "model.drop_path_rate=0.0", "data.batch_size=16", "data.num_instances=4",
        "data.test_batch_size=64", "train.epochs=2", "train.iters=4", "train.log_period=1", "eval.period=100",
        "train.eval_at_start=false", "cluster.k1=10", "cluster.k2=3", "cluster.eps=0.7", "data.num_workers=2"]),
    "pretrain": ("pretrain/train.py", "configs/pretrain/demo.yaml", [
        "model.arch=vit_tiny", "model.img_size=[64,32]", "model.out_dim=256", "model.hidden_dim=128",
        "model.bottleneck_dim=64", "crops.global_size=[64,32]", "crops.local_size=[32,16]", "monitor.period=0",
        "train.log_period=1", "train.precision=fp32", "train.device=cpu", "data.batch_size_per_gpu=16",
        "data.num_workers=2", "train.epochs=1", "optim.warmup_epochs=0"]),
}


def _pool_list(world: Path) -> Path:
    """The first 96 images of the generated pool: six pre-training iterations of 16."""
    path = world / "pool_96.txt"
    if not path.is_file():
        images = sorted(p.relative_to(world / "pool").as_posix() for p in (world / "pool").rglob("*.jpg"))
        path.write_text("\n".join(images[:96]) + "\n")
    return path


def _stage_overrides(stage: str, world: Path) -> list[str]:
    data = {"finetune": [f"data.root={world}/market"],
            "usl": [f"data.root={world}/market"],
            "pretrain": ["data.dataset=image_folder", f"data.root={world / 'pool'}",
                         f"data.file_list={_pool_list(world)}"]}[stage]
    return [*STAGES[stage][2], *data]


def _command(stage: str, output_dir: Path, world: Path) -> list[str]:
    entry, config, _ = STAGES[stage]
    return [sys.executable, "-u", str(REPO / entry), "--config-file", str(REPO / config),
            "--output-dir", str(output_dir), *_stage_overrides(stage, world)]


def _env() -> dict[str, str]:
    # One intra-op thread in every run: identical float summation order in the runs compared below.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_losses(output_dir: Path) -> dict[int, float]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if r.get("split") == "train" and "loss" in r}


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=_env(), cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _signal_group_after(command: list[str], output_dir: Path, steps: int) -> subprocess.CompletedProcess:
    """Start ``command`` in its own process group, SIGTERM the whole group once ``steps`` losses are logged."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                               cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while len(_train_losses(output_dir)) < steps:
            assert process.poll() is None, "the run ended before the signal:\n" + process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no training progress before the deadline"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGTERM)  # what SLURM sends every process of the step
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_sigterm_to_the_whole_process_group_checkpoints_and_the_resumed_run_continues_exactly(
        stage, synthetic_world, tmp_path):
    reference_dir, preempted_dir = tmp_path / "reference", tmp_path / "preempted"
    _run(_command(stage, reference_dir, synthetic_world))
    expected = _train_losses(reference_dir)

    stopped = _signal_group_after(_command(stage, preempted_dir, synthetic_world), preempted_dir, steps=2)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "killed by signal" not in stopped.stderr, stopped.stderr[-3000:]
    checkpoint = torch.load(preempted_dir / "checkpoint.pth", map_location="cpu", weights_only=False)
    stopped_at = checkpoint["iteration"]
    assert 2 <= stopped_at < max(expected), "the signal must stop the run mid-way"
    assert len(_train_losses(preempted_dir)) == stopped_at  # every finished step was logged, nothing more

    _run(_command(stage, preempted_dir, synthetic_world))
    continued = _train_losses(preempted_dir)
    assert sorted(continued) == sorted(expected)
    # Same code, same inputs, one thread in both processes: the float operations are identical, so the
    # losses agree to float32 round-off (1e-6 leaves room for nothing else).
    for step in sorted(expected):
        assert continued[step] == pytest.approx(expected[step], rel=1e-6), step


def test_one_guard_per_process_keeps_a_signal_received_during_the_set_up():
    previous = signal.getsignal(signal.SIGTERM)
    with preemption_guard() as outer:  # what run_training does before building data and model
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the stage is still setting up
        with preemption_guard() as inner:  # what the training loop does
            assert inner is outer and inner.requested()
        assert signal.getsignal(signal.SIGTERM) is not previous  # the outer install still holds
    assert signal.getsignal(signal.SIGTERM) is previous


class _Noisy(torch.utils.data.Dataset):
    """Sample ``i`` is ``i`` plus a draw from the global torch generator (what an augmentation does)."""

    def __len__(self) -> int:
        return 48

    def __getitem__(self, index: int) -> torch.Tensor:
        return index + torch.rand(())


def _epoch(sampler, workers: int, batch_size: int) -> dict[int, float]:
    loader = PreemptibleDataLoader(SeededSamples(_Noisy()), batch_size=batch_size,
                                   sampler=SampleSeeds(sampler, seed=7), num_workers=workers)
    return {int(value): float(value) for batch in loader for value in batch}


@pytest.mark.parametrize("workers", [0, 2])
def test_per_sample_seeds_make_batches_independent_of_workers_resume_and_process_count(workers):
    pids = [i // 4 for i in range(48)]
    single = RandomIdentitySampler(pids, batch_size=16, num_instances=4, seed=3)
    single.set_epoch(1)
    reference = _epoch(single, 0, 16)

    with_workers = RandomIdentitySampler(pids, batch_size=16, num_instances=4, seed=3)
    with_workers.set_epoch(1)
    assert _epoch(with_workers, workers, 16) == reference

    resumed = RandomIdentitySampler(pids, batch_size=16, num_instances=4, seed=3)
    resumed.load_state_dict({"epoch": 1, "position": 16})
    tail = _epoch(resumed, workers, 16)
    assert tail and all(reference[index] == value for index, value in tail.items())

    for sharded in (RandomIdentitySampler, ResumableDistributedSampler):
        whole = sharded(pids, 16, 4, seed=3) if sharded is RandomIdentitySampler else sharded(48, seed=3)
        whole.set_epoch(0)
        expected = _epoch(whole, 0, 8)
        for rank in range(2):
            shard = (sharded(pids, 16, 4, seed=3, rank=rank, world_size=2) if sharded is RandomIdentitySampler
                     else sharded(48, seed=3, rank=rank, world_size=2))
            shard.set_epoch(0)
            assert all(expected[index] == value for index, value in _epoch(shard, workers, 8).items())


def test_a_worker_that_dies_after_the_signal_does_not_interrupt_the_step(synthetic_world, tmp_path, monkeypatch):
    from passreid.finetune import FinetuneConfig, run_training
    from passreid.finetune.trainer import FinetuneTrainer

    def config(output_dir: Path) -> FinetuneConfig:
        return load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo.yaml",
                           [f"train.output_dir={output_dir}", *_stage_overrides("finetune", synthetic_world)])

    reference = run_training(config(tmp_path / "reference"), resume=False)
    original_step = FinetuneTrainer._step

    def step_then_signal_and_lose_a_worker(self, batch):
        values = original_step(self, batch)
        if self.iteration == 1:  # during iteration 2: the signal, then a worker dies (e.g. SLURM's SIGKILL)
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)  # not reaped here: PyTorch does
            time.sleep(0.5)  # SIGCHLD reaches this process here, in the middle of the step
        return values

    monkeypatch.setattr(FinetuneTrainer, "_step", step_then_signal_and_lose_a_worker)
    stopped = run_training(config(tmp_path / "preempted"), resume=False)
    assert stopped.preempted and stopped.iterations == 2

    monkeypatch.setattr(FinetuneTrainer, "_step", original_step)
    resumed = run_training(config(tmp_path / "preempted"), resume=True)
    assert resumed.iterations == reference.iterations
    expected, continued = _train_losses(tmp_path / "reference"), _train_losses(tmp_path / "preempted")
    assert sorted(continued) == sorted(expected)
    for step in sorted(expected):  # same process, same computations: float32 round-off at most
        assert continued[step] == pytest.approx(expected[step], rel=1e-6), step


# A loader whose workers ignore SIGTERM (as the stages' do) meets an error at its third item.
_FAILING_LOADER = """
import sys
from torch.utils.data import Dataset
from passreid.data import CorruptImageError
from passreid.engine import PreemptibleDataLoader, batches_until_preempted

class Failing(Dataset):
    def __len__(self):
        return 64
    def __getitem__(self, index):
        if index == 2:
            raise {error}
        return index

loader = PreemptibleDataLoader(Failing(), batch_size=1, num_workers=2)
{iterate}
"""


@pytest.mark.parametrize("error, iterate", [
    # a stage's loop: the fetch error ends the workers, and the entry point reports the error's own message
    ("CorruptImageError('/data/x.jpg', 'image file is truncated')",
     "from passreid.cli import describe_error\n"
     "try:\n    [b for b in batches_until_preempted(loader)]\n"
     "except CorruptImageError as error:\n    print('MESSAGE', describe_error(error))\n    sys.exit(2)"),
    # a bug that escapes with the iterator kept alive: the exit must not wait for workers that ignore SIGTERM
    ("ValueError('a bug')", "kept = iter(loader)\nwhile True:\n    next(kept)"),
])
def test_a_loader_error_ends_the_process_instead_of_leaving_it_waiting_for_its_workers(error, iterate):
    script = _FAILING_LOADER.format(error=error, iterate=iterate.replace("\\n", "\n"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0, done.stderr
    if "CorruptImageError(" in error:
        assert done.returncode == 2
        assert ("MESSAGE cannot decode image /data/x.jpg: image file is truncated (in a data-loading worker "
                "process 0)") in done.stdout, done.stdout + done.stderr
    else:
        assert "ValueError: a bug" in done.stderr
