"""Unit tests for passreid.engine: files, checkpoints, RNG, logging, AMP, guards, schedules."""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from _disk_full import fill_disk
from _spawn import process_group_of_one
from passreid.engine import (
    CHECKPOINT_KEYS,
    CheckpointCorruptError,
    Checkpointer,
    CheckpointStateError,
    MetricsWriter,
    NonFiniteLossError,
    ProgressLogger,
    apply_schedule,
    atomic_save,
    autocast_for,
    build_checkpoint,
    capture_rng_state,
    check_finite,
    cosine_schedule,
    format_eta,
    gather_rng_states,
    make_output_dir,
    output_layout,
    resolve_precision,
    restore_checkpoint,
    restore_rng_state,
    seed_everything,
    setup_logging,
    unwrap_model,
    warmup_cosine_lr,
    worker_init_fn,
)
from passreid.engine.logger import append_to_run_log


class _Records(logging.Handler):
    """Collects records straight from a logger (caplog relies on propagation to the root,
    which setup_logging switches off for the "passreid" logger)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.messages)


@pytest.fixture
def engine_logs() -> Iterator[_Records]:
    logger = logging.getLogger("passreid.engine")
    handler, previous_level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(previous_level)


# --------------------------------------------------------------------------- output directory


def test_make_output_dir_creates_nested_dir_and_layout_names(tmp_path: Path) -> None:
    root = make_output_dir(tmp_path / "runs" / "a")
    assert root.is_dir() and make_output_dir(root) == root  # idempotent
    layout = output_layout(root)
    assert [layout.config.name, layout.log.name, layout.metrics.name] == ["config.yaml", "log.txt", "metrics.jsonl"]
    assert [layout.tensorboard.name, layout.checkpoint.name, layout.final_model.name] == [
        "tb",
        "checkpoint.pth",
        "model_final.pth",
    ]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        make_output_dir(tmp_path / "file")
    # A parent that is a file: the error names the folder asked for (the stages print it as their one line).
    with pytest.raises(NotADirectoryError, match=f"cannot create the output directory {tmp_path / 'file' / 'run'}"):
        make_output_dir(tmp_path / "file" / "run")


# --------------------------------------------------------------------------- atomic_save


def _temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if ".tmp-" in p.name]


def test_atomic_save_writes_loadable_file_without_leftovers(tmp_path: Path) -> None:
    target = atomic_save({"a": torch.arange(5)}, tmp_path / "x.pth")
    assert torch.equal(torch.load(target)["a"], torch.arange(5))
    assert _temp_files(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_save({}, tmp_path / "missing" / "x.pth")


def test_atomic_save_failure_keeps_previous_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.pth"
    atomic_save({"v": 1}, target)
    with pytest.raises(Exception):
        atomic_save({"v": lambda: 2}, target)  # lambdas cannot be pickled: fails mid-write
    assert torch.load(target) == {"v": 1}
    assert _temp_files(tmp_path) == []


def test_stale_temp_files_of_dead_writers_are_removed_others_kept(tmp_path: Path) -> None:
    host = socket.gethostname()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)  # that process has exited
    dead = tmp_path / f".x.pth.tmp-{host}-{dead_pid}-abcd1234"
    alive = tmp_path / f".x.pth.tmp-{host}-{os.getpid()}-abcd1234"
    other_host = tmp_path / f".x.pth.tmp-elsewhere-{dead_pid}-abcd1234"
    other_target = tmp_path / f".y.pth.tmp-{host}-{dead_pid}-abcd1234"
    for path in (dead, alive, other_host, other_target):
        path.write_bytes(b"partial")
    atomic_save({"v": 1}, tmp_path / "x.pth")
    assert not dead.exists()
    assert alive.exists() and other_host.exists() and other_target.exists()
    assert torch.load(tmp_path / "x.pth") == {"v": 1}


# --------------------------------------------------------------------------- Checkpointer


def test_checkpointer_save_load_and_non_main_rank(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path / "out")
    assert not checkpointer.has_checkpoint() and checkpointer.load() is None
    assert checkpointer.save({"iteration": 3}) == tmp_path / "out" / "checkpoint.pth"
    assert checkpointer.has_checkpoint() and checkpointer.load() == {"iteration": 3}

    other_rank = Checkpointer(tmp_path / "rank1", is_main=False)
    assert other_rank.save({"iteration": 3}) is None
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(ValueError, match="plain file name"):
        checkpointer.save({}, name="../escape.pth")


def test_checkpointer_keeps_every_n_copies_unchanged_by_later_saves(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, keep_every=2)
    for step in range(2, 6):
        checkpointer.save({"iteration": step}, step=step)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint.prev.pth", "checkpoint.pth", "checkpoint_0000002.pth", "checkpoint_0000004.pth"]
    assert checkpointer.load("checkpoint_0000002.pth") == {"iteration": 2}
    assert checkpointer.load("checkpoint_0000004.pth") == {"iteration": 4}
    assert checkpointer.load() == {"iteration": 5}
    assert checkpointer.load("checkpoint.prev.pth") == {"iteration": 4}


@pytest.mark.parametrize("hard_links", [True, False])
def test_each_save_keeps_the_checkpoint_it_replaces(tmp_path: Path, monkeypatch, hard_links: bool) -> None:
    if not hard_links:  # e.g. some network filesystems: the previous file is renamed instead
        def no_links(*args, **kwargs):
            raise OSError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_links)
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save({"iteration": 1})
    assert not checkpointer.previous_path().exists()
    for step in (2, 3):
        checkpointer.save({"iteration": step})
        assert torch.load(checkpointer.path()) == {"iteration": step}
        assert torch.load(checkpointer.previous_path()) == {"iteration": step - 1}
    assert checkpointer.previous_path().name == "checkpoint.prev.pth"
    assert _temp_files(tmp_path) == []


def _damage(path: Path, damage: str) -> None:
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes({"garbage": b"not a checkpoint at all", "truncated": data[: len(data) // 2],
                          "empty": b""}[damage])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "missing"])
def test_load_falls_back_to_the_previous_checkpoint_naming_both(tmp_path: Path, engine_logs: _Records,
                                                                damage: str) -> None:
    writer = Checkpointer(tmp_path)
    for step in (1, 2):
        writer.save({"iteration": step, "weights": torch.full((1000,), float(step))})
    _damage(writer.path(), damage)

    resumed = Checkpointer(tmp_path)  # a new process resuming the run
    state = resumed.load()
    assert state["iteration"] == 1 and resumed.loaded_from == resumed.previous_path()
    assert str(resumed.path()) in engine_logs.text and str(resumed.previous_path()) in engine_logs.text
    # The next save replaces the damaged file and keeps the good previous one (not the damaged one).
    resumed.save({"iteration": 2})
    assert torch.load(resumed.path())["iteration"] == 2
    assert torch.load(resumed.previous_path())["iteration"] == 1
    resumed.save({"iteration": 3})
    assert torch.load(resumed.previous_path())["iteration"] == 2


def test_no_readable_checkpoint_is_an_error_saying_how_to_start_fresh(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path)
    for step in (1, 2):
        checkpointer.save({"iteration": step, "weights": torch.full((1000,), float(step))})
    _damage(checkpointer.path(), "truncated")
    _damage(checkpointer.previous_path(), "garbage")
    with pytest.raises(CheckpointCorruptError) as error:
        Checkpointer(tmp_path).load()
    message = str(error.value)
    assert str(checkpointer.path()) in message and str(checkpointer.previous_path()) in message
    assert "--no-resume" in message


def test_a_fresh_run_drops_the_previous_checkpoint_of_an_earlier_run(tmp_path: Path) -> None:
    earlier = Checkpointer(tmp_path)
    for step in (1, 2):
        earlier.save({"iteration": step, "run": "earlier"})
    fresh = Checkpointer(tmp_path)  # --no-resume: nothing loaded
    fresh.save({"iteration": 1, "run": "fresh"})
    assert not fresh.previous_path().exists()  # never fall back into another run
    fresh.save({"iteration": 2, "run": "fresh"})
    assert torch.load(fresh.previous_path()) == {"iteration": 1, "run": "fresh"}


@pytest.mark.parametrize("existing", [True, False])
def test_full_disk_while_saving_says_the_previous_checkpoint_is_intact(tmp_path: Path, monkeypatch,
                                                                       existing: bool) -> None:
    checkpointer = Checkpointer(tmp_path)
    if existing:
        for step in (1, 2):
            checkpointer.save({"iteration": step})
    fill_disk(monkeypatch, free_bytes=1024)
    with pytest.raises(OSError) as error:
        checkpointer.save({"iteration": 3, "weights": torch.zeros(10_000)})
    target = checkpointer.path()
    assert error.value.errno == errno.ENOSPC
    if existing:
        assert str(error.value.strerror) == (f"no space left on device while writing {target}; "
                                             f"the previous checkpoint {target} is intact")
        monkeypatch.undo()
        assert Checkpointer(tmp_path).load() == {"iteration": 2}
        assert torch.load(checkpointer.previous_path()) == {"iteration": 1}
    else:
        assert f"no earlier checkpoint existed at {target}" in error.value.strerror
        assert not target.exists()
    assert _temp_files(tmp_path) == []  # the partial file is removed: its space is free again


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_checkpoint_error_names_the_file(tmp_path: Path, damage: str) -> None:
    checkpointer = Checkpointer(tmp_path)
    path = checkpointer.save({"weights": torch.randn(1000)})
    data = path.read_bytes()
    path.write_bytes({"garbage": b"not a checkpoint at all", "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(CheckpointCorruptError, match=str(path)):
        checkpointer.load()


def test_checkpoint_holding_a_non_dict_is_rejected(tmp_path: Path) -> None:
    torch.save([1, 2], tmp_path / "checkpoint.pth")
    with pytest.raises(CheckpointCorruptError, match="expected a dict"):
        Checkpointer(tmp_path).load()


# --------------------------------------------------------------------------- build / restore


class CountingSampler:
    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


class EpochCounter:
    """A stateful scheduler-like object (a loop of one's own may checkpoint one under ``scheduler``)."""

    def __init__(self) -> None:
        self.last_epoch = 0

    def state_dict(self) -> dict[str, int]:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.last_epoch = state["last_epoch"]


def _trained_objects(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, EpochCounter]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = EpochCounter()
    for epoch in range(3):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(epoch + 1, 1e-2, 10, 2, 1e-4)
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        scheduler.last_epoch = epoch + 1 + seed
    return model, optimizer, scheduler


def test_build_and_restore_checkpoint_round_trip(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trained_objects(0)
    sampler = CountingSampler()
    sampler.position = 17
    scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    state = build_checkpoint(
        model=nn.DataParallel(model),  # wrappers are unwrapped: keys without "module."
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        epoch=3,
        iteration=30,
        sampler=sampler,
        config={"seed": 1},
        extra={"best_map": 0.5},
    )
    assert tuple(state) == CHECKPOINT_KEYS
    assert not any(key.startswith("module.") for key in state["model"])
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(state)
    loaded = checkpointer.load(weights_only=True)  # the standard content needs no arbitrary pickles

    fresh_model, fresh_optimizer, fresh_scheduler = _trained_objects(1)
    fresh_sampler, fresh_scaler = CountingSampler(), torch.amp.GradScaler("cpu")
    info = restore_checkpoint(
        loaded,
        model=fresh_model,
        optimizer=fresh_optimizer,
        scheduler=fresh_scheduler,
        scaler=fresh_scaler,
        sampler=fresh_sampler,
    )
    assert (info.epoch, info.iteration, info.config, info.extra) == (3, 30, {"seed": 1}, {"best_map": 0.5})
    for expected, actual in zip(model.state_dict().values(), fresh_model.state_dict().values()):
        assert torch.equal(expected, actual)
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], exp_avg)
    assert fresh_scheduler.last_epoch == 3 and fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert fresh_sampler.position == 17 and fresh_scaler.get_scale() == 128.0


def test_restore_checkpoint_rejects_foreign_or_mismatched_state(engine_logs: _Records) -> None:
    model, optimizer, _ = _trained_objects(0)
    with pytest.raises(CheckpointStateError, match="not a passreid training checkpoint"):
        restore_checkpoint(model.state_dict(), model=model)
    weights_only = build_checkpoint(model=model)
    with pytest.raises(CheckpointStateError, match="no 'optimizer' state"):
        restore_checkpoint(weights_only, model=model, optimizer=optimizer)
    restore_checkpoint(weights_only, model=model, scaler=torch.amp.GradScaler("cpu"))
    assert "GradScaler starts fresh" in engine_logs.text
    with pytest.raises(CheckpointStateError, match="Missing key"):  # strict model loading
        restore_checkpoint(build_checkpoint(model=nn.Linear(4, 8)), model=model)
    with pytest.raises(CheckpointStateError, match="does not fit this run's optimizer"):
        restore_checkpoint(build_checkpoint(model=model, optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters())),
                           model=model, optimizer=optimizer)

    @dataclass
    class Config:
        seed: int = 0

    with pytest.raises(TypeError, match="config_to_dict"):
        build_checkpoint(config=Config())


def test_unwrap_model_returns_inner_module() -> None:
    inner = nn.Linear(2, 2)
    assert unwrap_model(nn.DataParallel(inner)) is inner and unwrap_model(inner) is inner


def test_restore_with_more_ranks_than_saved_warns_and_reseeds(engine_logs: _Records) -> None:
    state = build_checkpoint(iteration=7)
    restore_checkpoint(state, rank=1, world_size=2)
    first = torch.rand(3)
    restore_checkpoint(state, rank=1, world_size=2)
    second = torch.rand(3)
    assert "world size 2" in engine_logs.text
    assert torch.equal(first, second)  # deterministic fallback seed from (iteration, rank)


# --------------------------------------------------------------------------- RNG and seeding


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(4)


def test_rng_capture_restore_reproduces_draws() -> None:
    seed_everything(123)
    _draws()  # move away from the freshly seeded state
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    first = _draws()
    _draws()
    restore_rng_state(state)
    second = _draws()
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
    with pytest.raises(KeyError, match="capture_rng_state"):
        restore_rng_state({"python": state["python"]})


def test_seed_everything_is_deterministic_and_validates() -> None:
    seed_everything(5)
    first = _draws()
    seed_everything(5)
    second = _draws()
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
    with pytest.raises(ValueError, match="2\\*\\*32"):
        seed_everything(-1)
    with pytest.raises(TypeError, match="int"):
        seed_everything(1.5)  # type: ignore[arg-type]


def test_gather_rng_states_single_process_and_world_of_one(tmp_path: Path) -> None:
    seed_everything(9)
    states = gather_rng_states()
    assert len(states) == 1 and torch.equal(states[0]["torch"], torch.get_rng_state())
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("another test left a process group initialised")
    with process_group_of_one("gloo", tmp_path / "store"):
        gathered = gather_rng_states()
    assert len(gathered) == 1 and torch.equal(gathered[0]["torch"], torch.get_rng_state())


class _WorkerRandomness(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[int, int, float]:
        return torch.initial_seed(), int(np.random.randint(1 << 30)), random.random()


def _worker_draws() -> list[tuple[int, int, float]]:
    loader = DataLoader(
        _WorkerRandomness(),
        batch_size=None,
        num_workers=2,
        worker_init_fn=worker_init_fn,
        multiprocessing_context="fork",
    )
    return [(int(a), int(b), float(c)) for a, b, c in loader]


@pytest.mark.skipif(sys.platform != "linux", reason="uses fork workers")
def test_worker_init_fn_seeds_numpy_and_random_from_torch_seed() -> None:
    seed_everything(11)
    first = _worker_draws()
    seed_everything(11)
    assert _worker_draws() == first
    assert len({seed for seed, _, _ in first}) == 2  # two workers, two seeds
    for worker_seed, numpy_value, python_value in first[:2]:  # each worker's first draw
        expected_numpy = np.random.RandomState(np.random.SeedSequence(worker_seed).generate_state(4))
        assert numpy_value == expected_numpy.randint(1 << 30)
        assert python_value == random.Random(worker_seed).random()


# --------------------------------------------------------------------------- logging and metrics


def test_setup_logging_rank0_writes_file_other_ranks_only_warn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = setup_logging(tmp_path, rank=0, name="passreid_test_main")
    setup_logging(tmp_path, rank=0, name="passreid_test_main")  # again: no duplicated handlers
    logger.info("hello from rank 0")
    for handler in logger.handlers:
        handler.flush()
    log_text = (tmp_path / "log.txt").read_text()
    assert log_text.count("hello from rank 0") == 1
    assert capsys.readouterr().out.count("hello from rank 0") == 1

    other_dir = tmp_path / "rank1"
    other = setup_logging(other_dir, rank=1, name="passreid_test_other")
    other.info("quiet info")
    other.warning("loud warning")
    out = capsys.readouterr().out
    assert "quiet info" not in out and "[rank 1]" in out and "loud warning" in out
    assert not other_dir.exists()


def test_console_lines_follow_the_current_stdout(tmp_path: Path) -> None:
    # A notebook, redirect_stdout or test capture replaces sys.stdout after set-up: the console handler writes to
    # the stream of the moment, and a replaced stream that was closed is not written to.
    import contextlib
    import io

    logger = setup_logging(None, rank=0, name="passreid_test_console")
    first, second = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(first):
        logger.info("into the first")
    first.close()
    with contextlib.redirect_stdout(second), contextlib.redirect_stderr(io.StringIO()) as errors:
        logger.info("into the second")
    assert "into the second" in second.getvalue() and errors.getvalue() == ""  # no "--- Logging error ---"


class _FullDiskStream:
    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        pass


def test_log_file_on_a_full_disk_is_reported_once_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = setup_logging(tmp_path, rank=0, name="passreid_test_full_disk")
    log_file = next(h for h in logger.handlers if isinstance(h, logging.FileHandler))
    log_file.stream = _FullDiskStream()
    logger.info("first line")
    logger.info("second line")
    captured = capsys.readouterr()
    assert captured.out.count("first line") == 1 and captured.out.count("second line") == 1  # the console has all
    assert captured.err == (f"passreid: cannot write to {tmp_path / 'log.txt'} (No space left on device); "
                            f"log lines go to the console only\n")  # once, and no "--- Logging error ---" trace


def test_append_to_run_log_writes_the_log_file_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logger = setup_logging(tmp_path, rank=0, name="passreid_test_append")
    assert append_to_run_log("why the run stopped", name="passreid_test_append") == [tmp_path / "log.txt"]
    assert "ERROR] why the run stopped" in (tmp_path / "log.txt").read_text()
    assert "why the run stopped" not in capsys.readouterr().out
    assert append_to_run_log("no log file", name="passreid_test_no_handlers") == []
    logger.handlers.clear()


def test_metrics_writer_json_lines_and_tensorboard(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path)
    writer.write(1, loss=torch.tensor(0.5), lr=np.float32(1e-3))
    writer.write(2, loss=float("nan"))
    writer.write(2, split="val", mAP=0.25)
    with pytest.raises(ValueError, match="reserved"):
        writer.write(3, time=1.0)
    with pytest.raises(ValueError, match="scalar"):
        writer.write(3, loss=torch.ones(2))
    with pytest.raises(TypeError, match="'name'"):
        writer.write(3, name="x")
    writer.close()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in lines] == [(1, "train"), (2, "train"), (2, "val")]
    assert lines[0]["loss"] == 0.5 and lines[0]["lr"] == pytest.approx(1e-3) and isinstance(lines[0]["time"], float)
    assert lines[1]["loss"] is None and lines[2]["mAP"] == 0.25

    event_files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")][0] == (1, 0.5)
    assert [(e.step, e.value) for e in events.Scalars("val/mAP")] == [(2, 0.25)]


def test_metrics_writer_disabled_writes_nothing(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "out", enabled=False)
    writer.write(1, loss=1.0)
    writer.close()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0:00:00"), (59.4, "0:00:59"), (3725, "1:02:05"), (100_000, "27:46:40"), (math.inf, "?:??:??")],
)
def test_format_eta(seconds: float, text: str) -> None:
    assert format_eta(seconds) == text


def test_progress_logger_lines_speed_and_eta(engine_logs: _Records) -> None:
    clock = iter(float(t) for t in range(100))  # one second per iteration
    logger = logging.getLogger("passreid.engine.test_progress")
    progress = ProgressLogger(total_iters=20, log_period=5, logger=logger, window=3, time_fn=lambda: next(clock))
    lines = [progress.update(i, loss=float(i), lr=torch.tensor(0.5)) for i in range(20)]
    logged = [line for line in lines if line is not None]
    assert len(logged) == 4 and lines[4] is not None and lines[3] is None
    # window of 3: median of losses 2,3,4 = 3; global mean of 0..4 = 2
    assert lines[4].startswith("it 5/20  loss 3 (2)  lr 0.5 (0.5)  1.00 it/s  eta 0:00:15")
    assert lines[19] is not None and "it 20/20" in lines[19] and "eta 0:00:00" in lines[19]
    assert engine_logs.messages == logged


# --------------------------------------------------------------------------- mixed precision


def test_autocast_for_cpu_precisions() -> None:
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    assert resolve_precision("cpu", "auto") == "fp32"
    fp32 = autocast_for("cpu", "auto")
    assert fp32.scaler is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 also disables an enclosing autocast
        with fp32.autocast():
            assert (a @ b).dtype == torch.float32
    bf16 = autocast_for(torch.device("cpu"), "bf16")
    assert bf16.scaler is None
    with bf16.autocast():
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast_for("cpu", "fp16")
    with pytest.raises(ValueError, match="one of"):
        autocast_for("cpu", "half")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_autocast_for_cuda_without_cuda_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        autocast_for("cuda", "auto")


@pytest.mark.cuda  # skipped without CUDA (tests/conftest.py)
def test_autocast_for_cuda_auto_and_fp16() -> None:
    a, b = torch.randn(4, 4, device="cuda"), torch.randn(4, 4, device="cuda")
    auto = autocast_for("cuda", "auto")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with auto.autocast():
        assert (a @ b).dtype == expected
    assert (auto.scaler is None) == (expected == torch.bfloat16)
    fp16 = autocast_for("cuda", "fp16")
    assert isinstance(fp16.scaler, torch.amp.GradScaler)
    with fp16.autocast():
        assert (a @ b).dtype == torch.float16


# --------------------------------------------------------------------------- non-finite guard


def test_check_finite_returns_value_and_raises_with_context() -> None:
    assert check_finite(torch.tensor(1.5), step=0) == 1.5
    with pytest.raises(NonFiniteLossError) as error:
        check_finite(torch.tensor(float("nan")), step=42, extra={"dino": float("nan"), "koleo": torch.tensor(0.25)})
    message = str(error.value)
    assert "step 42" in message and "nan" in message and "last good checkpoint" in message
    assert "dino=nan" in message and "koleo=0.25" in message and "learning rate" in message
    assert error.value.step == 42 and math.isnan(error.value.value)
    assert isinstance(error.value, FloatingPointError)
    with pytest.raises(NonFiniteLossError, match="inf"):
        check_finite(float("inf"), step=1)
    with pytest.raises(ValueError, match="scalar"):
        check_finite(torch.ones(3), step=1)


def test_nan_loss_stops_the_loop_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpointer = Checkpointer(tmp_path)
    poisoned_step = 3
    snapshot = None
    with pytest.raises(NonFiniteLossError, match=f"step {poisoned_step}"):
        for step in range(6):
            loss = model(torch.randn(4, 3)).pow(2).mean()
            if step == poisoned_step:
                snapshot = checkpointer.path().read_bytes()
                loss = loss * float("nan")
            check_finite(loss, step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            checkpointer.save(build_checkpoint(model=model, optimizer=optimizer, iteration=step + 1))
    assert checkpointer.path().read_bytes() == snapshot
    last_good = checkpointer.load()
    assert last_good["iteration"] == poisoned_step
    for name, value in model.state_dict().items():  # the NaN never reached the weights either
        assert torch.isfinite(value).all() and torch.equal(last_good["model"][name], value)


# --------------------------------------------------------------------------- schedules


def _cosine_reference(base: float, final: float, total: int, warmup: int, start: float) -> list[float]:
    values = [start + (base - start) * i / (warmup - 1) if warmup > 1 else base for i in range(warmup)]
    n = total - warmup
    values += [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    return values


@pytest.mark.parametrize("total, warmup, start", [(50, 10, 0.0), (37, 0, 0.0), (20, 5, 1e-4), (8, 8, 0.0)])
def test_cosine_schedule_matches_formula(total: int, warmup: int, start: float) -> None:
    schedule = cosine_schedule(2e-3, 1e-6, total, warmup_iters=warmup, start_warmup=start)
    assert schedule.shape == (total,)
    np.testing.assert_allclose(schedule, _cosine_reference(2e-3, 1e-6, total, warmup, start), rtol=1e-12, atol=0)


def test_cosine_schedule_pass_endpoints() -> None:
    # PASS-reID: PASS/utils.py cosine_scheduler as PASS/main_pass.py calls it: lr 0 -> peak at the end of
    # warm-up -> ~min_lr; wd 0.04 -> ~0.4
    niter, epochs, warmup_epochs = 10, 100, 10
    lr = cosine_schedule(2e-3, 1e-6, epochs * niter, warmup_iters=warmup_epochs * niter)
    assert lr[0] == 0.0 and lr[warmup_epochs * niter - 1] == 2e-3 and lr[warmup_epochs * niter] == 2e-3
    assert lr[-1] == pytest.approx(1e-6, abs=1e-8) and lr[-1] > 1e-6
    wd = cosine_schedule(0.04, 0.4, epochs * niter)
    assert wd[0] == pytest.approx(0.04, rel=1e-12) and wd[-1] == pytest.approx(0.4, abs=1e-5)
    with pytest.raises(ValueError, match="warmup_iters"):
        cosine_schedule(1.0, 0.0, 10, warmup_iters=11)
    with pytest.raises(ValueError, match="total_iters"):
        cosine_schedule(1.0, 0.0, 0)


def test_warmup_cosine_lr_formula_values() -> None:
    base, init, low, total, warmup = 4e-4, 4e-6, 8e-7, 120, 20
    assert warmup_cosine_lr(0, base, total, warmup, init, low) == init
    assert warmup_cosine_lr(10, base, total, warmup, init, low) == pytest.approx(init + 10 * (base - init) / 20)
    expected_20 = low + 0.5 * (base - low) * (1 + math.cos(math.pi * 20 / 120))  # t not shifted by warm-up
    assert warmup_cosine_lr(20, base, total, warmup, init, low) == pytest.approx(expected_20)
    assert warmup_cosine_lr(20, base, total, warmup, init, low) < base
    assert warmup_cosine_lr(120, base, total, warmup, init, low) == low
    assert warmup_cosine_lr(5, base, total, 0, init, low) == pytest.approx(
        low + 0.5 * (base - low) * (1 + math.cos(math.pi * 5 / 120))
    )


def test_warmup_cosine_lr_matches_timm_cosine_scheduler() -> None:
    from timm.scheduler import CosineLRScheduler

    base = 4e-4

    def optimizer() -> torch.optim.Optimizer:
        weight, bias = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
        return torch.optim.SGD([{"params": [weight], "lr": base}, {"params": [bias], "lr": 2 * base}], lr=base)

    timm_optimizer = optimizer()
    kwargs = dict(warmup_lr_init=0.01 * base, lr_min=0.002 * base)
    reference = CosineLRScheduler(timm_optimizer, t_initial=120, warmup_t=20, cycle_limit=1, **kwargs)
    for epoch in range(0, 131):
        reference.step(epoch)
        for group_base, ref_group in zip((base, 2 * base), timm_optimizer.param_groups):  # each group's own base lr
            ours = warmup_cosine_lr(epoch, group_base, 120, 20, **kwargs)
            assert ours == pytest.approx(ref_group["lr"], rel=1e-12), epoch  # same formula: float rounding only


def test_apply_schedule_uses_group_multipliers() -> None:
    weight, bias = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [weight], "lr_multiplier": 0.5}, {"params": [bias], "wd_multiplier": 0.0}])
    apply_schedule(opt, lr=1e-3, weight_decay=0.04)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 1e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.04, 0.0]
    apply_schedule(opt, weight_decay=0.4)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 1e-3]
