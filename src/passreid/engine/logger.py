"""Rank-aware logging, metrics files (JSON lines + TensorBoard) and progress lines with ETA (training
iterations: ProgressLogger; long passes such as feature extraction: ThroughputLogger)."""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from passreid.engine.output import output_layout

_HANDLER_FLAG = "_passreid_handler"
_FORMAT = "[%(asctime)s %(name)s %(levelname)s] %(message)s"
_DATE_FORMAT = "%m/%d %H:%M:%S"


class ConsoleHandler(logging.StreamHandler):
    """A handler that writes to ``sys.stdout`` / ``sys.stderr`` as they are at each record, not as they were
    when it was made: notebooks, ``contextlib.redirect_stdout`` and test capture replace them, and a handler
    bound to a replaced stream that was since closed fails every record."""

    def __init__(self, stream_name: str = "stdout") -> None:
        if stream_name not in ("stdout", "stderr"):
            raise ValueError(f"ConsoleHandler: stream_name must be 'stdout' or 'stderr', got {stream_name!r}")
        self.stream_name = stream_name
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler assigns it; the current one is always used
        pass


def setup_logging(
    output_dir: str | os.PathLike[str] | None = None,
    rank: int = 0,
    name: str = "passreid",
    level: int = logging.INFO,
) -> logging.Logger:
    """Configure logger ``name`` (and so every ``passreid.*`` module logger) and return it.

    Rank 0: console at ``level`` plus ``<output_dir>/log.txt`` (appended, so resumed runs keep
    their history). Other ranks: console warnings only, prefixed with the rank, and no file,
    so ranks never clobber each other's log. Calling again replaces the handlers it added.
    """
    logger = logging.getLogger(name)
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_FLAG, False):
            logger.removeHandler(handler)
            handler.close()

    prefix = "" if rank == 0 else f"[rank {rank}] "
    formatter = logging.Formatter(prefix + _FORMAT, datefmt=_DATE_FORMAT)
    console = ConsoleHandler("stdout")
    console.setLevel(level if rank == 0 else max(level, logging.WARNING))
    handlers: list[logging.Handler] = [console]
    if rank == 0 and output_dir is not None:
        log_path = output_layout(output_dir).log
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(_RunLogHandler(log_path))
    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _HANDLER_FLAG, True)
        logger.addHandler(handler)
    return logger


class _RunLogHandler(logging.FileHandler):
    """``log.txt``: a write that fails (full disk, file made read-only) is reported once on stderr, in one
    line, instead of a traceback per log line; the console keeps every line."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8")
        self.write_failed = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        if not self.write_failed:
            self.write_failed = True
            print(f"passreid: cannot write to {self.baseFilename} ({error.strerror or error}); log lines go to the "
                  f"console only", file=sys.stderr)


def append_to_run_log(message: str, name: str = "passreid", level: int = logging.ERROR) -> list[Path]:
    """Append ``message`` to the log files :func:`setup_logging` opened for logger ``name`` (a run's
    ``log.txt``), not to the console; returns the files written.

    The error boundary of the entry points records there why a run stopped (it prints the console copy
    itself). A file that cannot be written (full disk) is left out.
    """
    logger = logging.getLogger(name)
    record = logger.makeRecord(name, level, __file__, 0, message, None, None)
    written = []
    for handler in logger.handlers:
        if isinstance(handler, _RunLogHandler):
            try:
                with open(handler.baseFilename, "a", encoding="utf-8") as log_file:
                    log_file.write(handler.format(record) + "\n")
            except OSError:
                continue
            written.append(Path(handler.baseFilename))
    return written


def run_position(epoch: int, done_in_epoch: int) -> str:
    """Where a run stands, for the log, with epochs counted from 1: ``"after epoch 8"`` when 8 epochs are
    complete and the 9th has not started (``done_in_epoch == 0``), else ``"in epoch 9"``."""
    return f"after epoch {epoch}" if done_in_epoch == 0 else f"in epoch {epoch + 1}"


def _to_float(key: str, value: Any) -> float:
    """A scalar as float; 1-element tensors and numpy scalars accepted."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
        return float(value)
    raise TypeError(f"metric {key!r}: expected a number or scalar tensor, got {type(value).__name__}")


class MetricsWriter:
    """Appends scalar metrics to ``metrics.jsonl`` and TensorBoard (``tb/``) on the main rank.

    Each :meth:`write` adds one line ``{"step", "split", "time", <scalars>}``, flushed at once.
    The trainers' ``step`` is the number of optimizer steps completed when the record is written: 1 for
    the first training step, 0 for an evaluation before training.
    Non-finite values are written as ``null`` (strict JSON); TensorBoard gets them as is.
    The TensorBoard writer is created on first use (importing tensorboard is slow).
    ``purge_step`` (the resumed iteration + 1) drops TensorBoard events at or after it that a
    crashed run wrote after its last checkpoint. In ``metrics.jsonl`` such lines stay; the
    last line per ``(split, step)`` is the valid one.
    """

    _RESERVED = ("step", "split", "time")

    def __init__(self, output_dir: str | os.PathLike[str], enabled: bool = True, purge_step: int | None = None):
        self.layout = output_layout(output_dir)
        self.enabled = enabled
        self.purge_step = purge_step
        self._file: TextIO | None = None
        self._tensorboard: Any = None

    def write(self, step: int, split: str = "train", **scalars: Any) -> None:
        """Record ``scalars`` at ``step`` under ``split`` (TensorBoard tag ``<split>/<name>``)."""
        if not self.enabled:
            return
        clashes = [key for key in scalars if key in self._RESERVED]
        if clashes:
            raise ValueError(f"MetricsWriter.write: metric names {clashes} are reserved ({self._RESERVED})")
        values = {key: _to_float(key, value) for key, value in scalars.items()}
        record: dict[str, Any] = {"step": int(step), "split": split, "time": time.time()}
        record.update({key: value if math.isfinite(value) else None for key, value in values.items()})
        if self._file is None:
            self.layout.root.mkdir(parents=True, exist_ok=True)
            self._file = open(self.layout.metrics, "a", encoding="utf-8")
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        writer = self._summary_writer()
        for key, value in values.items():
            writer.add_scalar(f"{split}/{key}", value, int(step))

    def _summary_writer(self) -> Any:
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.layout.tensorboard), purge_step=self.purge_step)
        return self._tensorboard

    def flush(self) -> None:
        """Flush TensorBoard events to disk (the JSON file is flushed on every write)."""
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        """Flush and close both outputs; a later :meth:`write` reopens them."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SmoothedValue:
    """A series summarised by the median / mean of its last ``window`` values and its global mean."""

    def __init__(self, window: int = 20) -> None:
        if window <= 0:
            raise ValueError(f"SmoothedValue: window must be positive, got {window}")
        self.values: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float) -> None:
        self.values.append(value)
        self.total += value
        self.count += 1

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def avg(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else math.nan


def format_eta(seconds: float) -> str:
    """``h:mm:ss`` (hours unbounded, e.g. ``27:46:40``); ``?:??:??`` when unknown (nan / inf)."""
    if not math.isfinite(seconds):
        return "?:??:??"
    if seconds < 0:
        raise ValueError(f"format_eta: seconds must be >= 0, got {seconds}")
    total = int(round(seconds))
    hours, remainder = divmod(total, 3600)
    minutes, secs = divmod(remainder, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressLogger:
    """Periodic progress lines: iteration, smoothed values, it/s, ETA and CUDA memory.

    Call :meth:`update` once per iteration (0-based index of the iteration just finished).
    A line is logged every ``log_period`` iterations and at the last one, e.g.
    ``it 200/1000  loss 0.4321 (0.4502)  lr 0.0004  12.50 it/s  eta 0:01:04  mem 812M``,
    values shown as window median (global mean). it/s uses the window median of iteration
    times; the ETA uses the mean time per iteration measured in this process, so a resumed
    run (pass absolute iteration indices) estimates from its own speed.
    """

    def __init__(
        self,
        total_iters: int,
        log_period: int,
        logger: logging.Logger,
        window: int = 20,
        time_fn: Callable[[], float] = time.perf_counter,
    ) -> None:
        if total_iters <= 0 or log_period <= 0:
            raise ValueError(
                f"ProgressLogger: total_iters and log_period must be positive, got {total_iters}, {log_period}"
            )
        self.total_iters = total_iters
        self.log_period = log_period
        self.logger = logger
        self.window = window
        self.meters: dict[str, SmoothedValue] = {}
        self.iter_time = SmoothedValue(window)
        self._time_fn = time_fn
        self._last_time = time_fn()

    def update(self, iteration: int, **values: Any) -> str | None:
        """Record ``values`` for ``iteration``; return the logged line, or ``None`` if not logged."""
        now = self._time_fn()
        self.iter_time.update(now - self._last_time)
        self._last_time = now
        for key, value in values.items():
            self.meters.setdefault(key, SmoothedValue(self.window)).update(_to_float(key, value))
        done = iteration + 1
        if done % self.log_period != 0 and done != self.total_iters:
            return None
        line = self._format_line(done)
        self.logger.info(line)
        return line

    def _format_line(self, done: int) -> str:
        parts = [f"it {done}/{self.total_iters}"]
        parts += [f"{key} {meter.median:.4g} ({meter.global_avg:.4g})" for key, meter in self.meters.items()]
        seconds_per_iter = self.iter_time.median
        iters_per_second = 1.0 / seconds_per_iter if seconds_per_iter > 0 else math.inf
        eta = self.iter_time.global_avg * max(self.total_iters - done, 0)
        parts += [f"{iters_per_second:.2f} it/s", f"eta {format_eta(eta)}"]
        if torch.cuda.is_available():
            parts.append(f"mem {torch.cuda.max_memory_allocated() / 2**20:.0f}M")
        return "  ".join(parts)



class ThroughputLogger:
    """Progress of one long pass over ``total`` batches that logs nothing else (feature extraction): a line
    at most every ``interval_s`` seconds, e.g.
    ``gallery features: batch 40/249 (10240 images)  35.2 images/s  eta 0:01:39``,
    and, when any such line was logged, a closing ``gallery features: 15913 images in 0:07:32 (35.2 images/s)``.
    A pass shorter than ``interval_s`` stays silent. The rate is the mean since the start; the ETA assumes the
    remaining batches take as long as the done ones on average. ``total=None`` (unknown length): no ETA.
    """

    def __init__(self, what: str, total: int | None, logger: logging.Logger, interval_s: float = 30.0,
                 unit: str = "images", time_fn: Callable[[], float] = time.perf_counter) -> None:
        self.what, self.total, self.logger, self.interval_s, self.unit = what, total, logger, interval_s, unit
        self._time_fn = time_fn
        self.start = self._last_line = time_fn()
        self.batches = self.items = 0
        self.lines_logged = 0

    def update(self, count: int) -> str | None:
        """Record one finished batch of ``count`` items; return the logged line, or ``None``."""
        self.batches += 1
        self.items += count
        now = self._time_fn()
        if now - self._last_line < self.interval_s:
            return None
        self._last_line = now
        elapsed = now - self.start
        of_total = f"/{self.total}" if self.total is not None else ""
        parts = [f"{self.what}: batch {self.batches}{of_total} ({self.items} {self.unit})", self._rate(elapsed)]
        if self.total is not None:
            parts.append(f"eta {format_eta(elapsed / self.batches * max(self.total - self.batches, 0))}")
        return self._log("  ".join(parts))

    def finish(self) -> str | None:
        """Log the totals if any progress line was logged (so a long pass is seen to end); return the line."""
        if not self.lines_logged:
            return None
        elapsed = self._time_fn() - self.start
        return self._log(f"{self.what}: {self.items} {self.unit} in {format_eta(elapsed)} ({self._rate(elapsed)})")

    def _rate(self, elapsed: float) -> str:
        return f"{self.items / elapsed:.1f} {self.unit}/s" if elapsed > 0 else f"? {self.unit}/s"

    def _log(self, line: str) -> str:
        self.lines_logged += 1
        self.logger.info(line)
        return line
