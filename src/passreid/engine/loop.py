"""The epoch loop shared by the supervised fine-tuning and the Cluster-Contrast (USL/UDA) trainers.

:class:`EpochTrainer` owns what both runs do the same way: process set-up (distributed env, device,
output folder, logging, saved config, seeds), the epoch loop with its checkpoint and evaluation periods,
``train.max_iters`` and the pre-emption stop, the P x K training epoch resumable mid-epoch, the
checkpoint with its resume, and the final evaluation. A trainer supplies the model, data and outputs
through the hooks listed in the class docstring.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from passreid import dist
from passreid.config import config_to_dict, save_config
from passreid.data.samplers import BatchShardedSampler, SampleSeeds, SeededSamples
from passreid.engine import (Checkpointer, MetricsWriter, PreemptionGuard, ProgressLogger, autocast_for,
                             batches_until_preempted, build_checkpoint, gather_rng_states, make_output_dir,
                             output_layout, preemption_guard, restore_checkpoint, run_precision, save_schedules,
                             seed_everything, select_device, setup_logging)
from passreid.engine.logger import run_position
from passreid.engine.preemption import PreemptibleDataLoader
from passreid.seeding import worker_init_fn

__all__ = ["EpochTrainer", "build_train_loader", "loader_generator", "torch_threads"]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads (0: leave the setting alone), then restore the setting."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def loader_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    """The DataLoader's own generator for (seed, rank, epoch): creating an iterator must not draw from
    the global RNG (exact resume), and workers of different ranks/epochs get different seeds."""
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state % (2**63)))


def build_train_loader(dataset: Dataset, sampler: BatchShardedSampler, seed: int, num_workers: int, epoch: int,
                       rank: int, pin_memory: bool) -> DataLoader:
    """One epoch's loader over ``sampler`` (set to ``epoch`` by the caller) with ``per_rank_batch_size`` batches.

    Each sample's augmentation is seeded from its position in the epoch (``SampleSeeds``), so batches are
    the same with any ``num_workers``, after a mid-epoch resume and on any number of processes.
    """
    return PreemptibleDataLoader(
        SeededSamples(dataset),
        batch_size=sampler.per_rank_batch_size,
        sampler=SampleSeeds(sampler, seed),
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        worker_init_fn=worker_init_fn,
        generator=loader_generator(seed, rank, epoch),
    )



class EpochTrainer:
    """Trains epoch by epoch with periodic checkpoints and evaluations, exact resume and pre-emption stop.

    The config needs ``train.{device, output_dir, seed, epochs, max_iters, checkpoint_period, log_period,
    precision}`` and ``eval.{period, precision}``. The set-up resolves both precisions for the device
    (``precision``), logs them and writes them at the top of ``config.yaml``; training steps run under
    ``amp`` (autocast + GradScaler of ``train.precision``), evaluation features under ``eval_amp``.
    A subclass sets ``log`` (its logger) and ``stage_name`` (for the finished line) and implements these hooks:

    - ``_build(resuming)``: data, ``model``, ``optimizer``, ``train_set`` and ``sampler`` (``None``
      until ``_prepare_epoch``), optionally ``scheduler``; when ``resuming`` no pretrained weight is read.
    - ``_wrap_distributed()``: wrap the trained module in DDP (``world_size > 1``); ``_log_setup()``.
    - ``_epoch_lengths()``: optimizer steps of every epoch; ``_epoch_lrs(epoch)``: each param group's learning
      rate in ``epoch``. From them the loop precomputes the run's per-iteration schedule (``lr_schedule``, kept in
      the run folder as ``schedules.npz``) and sets every step's rates from it.
    - ``_step(batch)`` (one optimizer step -> scalars with ``loss``, ``lr``).
    - ``_evaluate()`` (sets ``last_metrics`` / ``last_eval_iteration``), ``_save_final_model()`` and
      ``_result(final_path, preempted)``, the object :meth:`run` returns.

    Optional hooks: ``_before_epochs()`` (e.g. evaluate the starting model), ``_prepare_epoch(epoch)``
    (e.g. re-cluster), ``_finish_epoch(epoch)`` (the per-epoch record), ``_checkpoint_extra(stopped_in)``
    and ``_restore_extra(extra)`` (the trainer's own checkpoint state), ``_resume_note()``,
    ``loader_config`` and ``train_module`` (what ``.train()`` is called on).
    """

    log = logging.getLogger("passreid")
    stage_name = "training"

    def __init__(self, cfg: Any, resume: bool = True) -> None:
        self.cfg = cfg
        self._set_up_process()
        self._init_loop_state()
        resuming = resume and self.checkpointer.has_checkpoint()
        self._build(resuming)
        self.lr_schedule = self._build_lr_schedule()
        if resuming:
            self._resume()
        if self.world_size > 1:
            self._wrap_distributed()
        self.metrics = MetricsWriter(self.output_dir, enabled=self.rank == 0,
                                     purge_step=self.iteration + 1 if self.iteration else None)
        self._log_setup()

    def _set_up_process(self) -> None:
        """Distributed env, device, output folder with its log and saved config, seeds, checkpointer."""
        train = self.cfg.train
        self.env = dist.init_distributed()
        self.rank, self.world_size = self.env.rank, self.env.world_size
        self.device = select_device(train.device, self.env.local_rank)
        self.precision = run_precision(self.device, train.precision, self.cfg.eval.precision)
        self.amp = autocast_for(self.device, self.precision.train)
        self.eval_amp = autocast_for(self.device, self.precision.eval)
        self.output_dir = make_output_dir(train.output_dir)
        setup_logging(self.output_dir, rank=self.rank)
        self.log.info("precision on %s: %s", self.device, self.precision.describe())
        if self.rank == 0:
            save_config(self.cfg, output_layout(self.output_dir).config,
                        comment=f"precision that ran on {self.device}: {self.precision.describe()}")
        seed_everything(train.seed + self.rank)
        self.checkpointer = Checkpointer(self.output_dir, is_main=self.rank == 0)

    def _init_loop_state(self) -> None:
        """Where a fresh run starts; :meth:`_resume` overwrites it from the checkpoint."""
        self.scheduler = None
        self.epoch, self.iteration = 0, 0
        self.pending_sampler_state: dict[str, int] | None = None
        self.last_eval_iteration: int | None = None
        self.last_metrics: dict[str, float] | None = None
        self.preempted = False
        self.guard = PreemptionGuard()  # inert until run() installs the signal handlers

    # ------------------------------------------------------------------ hooks with defaults
    @property
    def loader_config(self) -> Any:
        """The config whose ``train.seed`` and ``data.num_workers`` the training loader uses."""
        return self.cfg

    @property
    def train_module(self) -> nn.Module:
        return self.model

    def _before_epochs(self) -> None:
        """Runs once before the epoch loop."""

    def _prepare_epoch(self, epoch: int) -> None:
        """Runs before each (possibly resumed) epoch."""

    def _finish_epoch(self, epoch: int) -> None:
        """Runs after each completed epoch, before its checkpoint and evaluation."""

    def _checkpoint_extra(self, stopped_in_epoch: int | None) -> dict[str, Any]:
        """The trainer's own checkpoint state; ``stopped_in_epoch`` is set for a mid-epoch checkpoint."""
        return {}

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        """Reads back what :meth:`_checkpoint_extra` saved."""

    def _resume_note(self) -> str:
        return ""

    def _ddp(self, module: nn.Module, **options: Any) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **options)

    def _clamp_to_max_iters(self, total: int) -> int:
        return min(total, self.cfg.train.max_iters) if self.cfg.train.max_iters else total

    def total_iterations(self) -> int:
        """Optimizer steps of the whole run (``train.max_iters`` included)."""
        return len(self.lr_schedule)

    def _build_lr_schedule(self) -> np.ndarray:
        """The learning rate of every param group at every iteration, ``(iterations, groups)``: constant within an
        epoch, as the published recipes step per epoch. Rank 0 writes it (with each iteration's 1-based epoch) to
        ``schedules.npz`` so the curve can be compared with the published code's."""
        lengths = self._epoch_lengths()
        epochs = np.repeat(np.arange(1, len(lengths) + 1), lengths)
        rates = np.array([self._epoch_lrs(epoch) for epoch in range(len(lengths))], dtype=np.float64)
        total = self._clamp_to_max_iters(int(sum(lengths)))
        schedule = np.repeat(rates, lengths, axis=0)[:total]
        if self.rank == 0:
            save_schedules(output_layout(self.output_dir).schedules, lr=schedule, epoch=epochs[:total])
        return schedule

    def _apply_lrs(self, iteration: int) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.lr_schedule[iteration]):
            group["lr"] = float(lr)

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        state = self.checkpointer.load()
        if state is None:
            return
        info = restore_checkpoint(state, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                  scaler=self.amp.scaler, rank=self.rank, world_size=self.world_size)
        self.epoch, self.iteration, self.pending_sampler_state = info.epoch, info.iteration, info.sampler
        position = (self.pending_sampler_state or {}).get("position", 0)
        self.last_metrics = info.extra.get("last_metrics")
        self.last_eval_iteration = info.extra.get("last_eval_iteration")
        self._restore_extra(info.extra)
        self._warn_config_changes(info.config or {})
        self.log.info("resumed from %s at iteration %d, %s (sampler position %d)%s", self.checkpointer.loaded_from,
                      self.iteration, run_position(self.epoch, position), position, self._resume_note())

    def _warn_config_changes(self, saved: dict[str, Any]) -> None:
        """Resuming with a changed config is allowed (e.g. more epochs) but never silent."""
        current = config_to_dict(self.cfg)
        changed = [f"{section}.{key}: {saved[section][key]!r} -> {value!r}"
                   for section, values in current.items() if isinstance(values, dict) and section in saved
                   for key, value in values.items()
                   if key != "output_dir" and saved[section].get(key) != value]
        if changed:
            self.log.warning("resuming with a config that differs from the checkpoint's: %s", "; ".join(changed))

    # ------------------------------------------------------------------ loop
    def run(self) -> Any:
        """Train until ``train.epochs`` (or ``train.max_iters``), evaluate, write ``model_final.pth``.

        On a pre-emption signal (SIGUSR1/SIGTERM) it writes ``checkpoint.pth`` after the current
        iteration and returns with ``preempted=True`` instead (no evaluation, no final model).
        """
        with preemption_guard() as self.guard:
            return self._run()

    def _run(self) -> Any:
        self._before_epochs()
        progress = ProgressLogger(self.total_iterations(), self.cfg.train.log_period, self.log)
        self._run_epochs(progress)
        if self.preempted:
            self.log.info("stopped by a pre-emption signal at iteration %d; checkpoint written, resume to continue",
                          self.iteration)
            self.metrics.close()
            return self._result(None, preempted=True)
        if self.last_eval_iteration != self.iteration:
            self._evaluate()
        final_path = self._save_final_model()
        self.metrics.close()
        self.log.info("%s finished at epoch %d, iteration %d", self.stage_name, self.epoch, self.iteration)
        return self._result(final_path, preempted=False)

    def _run_epochs(self, progress: ProgressLogger) -> None:
        """Epochs from ``self.epoch`` on, each checkpointed and evaluated at its period; stops early at
        ``train.max_iters`` or a pre-emption signal."""
        train = self.cfg.train
        for epoch in range(self.epoch, train.epochs):
            if self._reached_max_iters():
                break
            self._prepare_epoch(epoch)
            if not self._train_epoch(epoch, progress):
                break
            self._finish_epoch(epoch)
            self.epoch = epoch + 1
            last = self.epoch == train.epochs or self._reached_max_iters()
            if self.epoch % train.checkpoint_period == 0 or last or self.preempted:
                self._save_checkpoint({"epoch": self.epoch, "position": 0})
            if self.preempted:
                break
            if self.epoch % self.cfg.eval.period == 0 or last:
                self._evaluate()

    def _reached_max_iters(self) -> bool:
        return bool(self.cfg.train.max_iters) and self.iteration >= self.cfg.train.max_iters

    def _train_epoch(self, epoch: int, progress: ProgressLogger) -> bool:
        """One epoch (or its remainder after a resume); False when stopped mid-epoch (``max_iters`` or a
        pre-emption signal), after writing a checkpoint at the sampler's position."""
        loader = self._epoch_loader(epoch)
        self.train_module.train()
        batches = 0
        for batch in batches_until_preempted(loader):
            self._apply_lrs(self.iteration)
            terms = self._step(batch)
            self.iteration += 1
            batches += 1
            progress.update(self.iteration - 1, **terms)
            if self.iteration % self.cfg.train.log_period == 0:
                self.metrics.write(self.iteration, split="train", epoch=epoch + 1, **terms)
            if self.guard.requested():
                self.preempted = True
                break
            if self._reached_max_iters():
                break
        position = self.sampler.state_dict(consumed=batches * self.sampler.per_rank_batch_size)
        if position["position"] < len(self.sampler):
            # Short of the epoch's end without max_iters or a pre-emption stop: batches_until_preempted ended
            # the epoch after a signal this rank received.
            self.preempted = self.preempted or not self._reached_max_iters()
            self._save_checkpoint(position, stopped_in_epoch=epoch)
            reason = "a pre-emption signal" if self.preempted else "train.max_iters"
            self.log.info("stopped at iteration %d (%s) in epoch %d; checkpoint saved", self.iteration, reason,
                          epoch + 1)
            return False
        return True

    def _epoch_loader(self, epoch: int) -> torch.utils.data.DataLoader:
        """The epoch's loader, starting at the resumed sampler position when the run resumes in it."""
        self.sampler.set_epoch(epoch)
        if self.pending_sampler_state is not None and self.pending_sampler_state["epoch"] == epoch:
            self.sampler.load_state_dict(self.pending_sampler_state)
        self.pending_sampler_state = None
        cfg = self.loader_config
        return build_train_loader(self.train_set, self.sampler, cfg.train.seed, cfg.data.num_workers, epoch,
                                  self.rank, pin_memory=self.device.type == "cuda")

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        """Zero the gradients, back-propagate ``loss`` and step the optimizer (through the AMP scaler)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.amp.scaler is not None:
            self.amp.scaler.scale(loss).backward()
            self.amp.scaler.step(self.optimizer)
            self.amp.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    # ------------------------------------------------------------------ outputs
    def _save_checkpoint(self, sampler_position: dict[str, int], stopped_in_epoch: int | None = None) -> None:
        rng_states = gather_rng_states()  # collective: every rank calls it
        extra = {"last_metrics": self.last_metrics, "last_eval_iteration": self.last_eval_iteration,
                 **self._checkpoint_extra(stopped_in_epoch)}
        state = build_checkpoint(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                 scaler=self.amp.scaler, epoch=self.epoch, iteration=self.iteration,
                                 sampler=sampler_position, config=config_to_dict(self.cfg), extra=extra,
                                 rng_states=rng_states)
        self.checkpointer.save(state)

    # ------------------------------------------------------------------ required hooks
    def _build(self, resuming: bool) -> None:
        raise NotImplementedError

    def _wrap_distributed(self) -> None:
        raise NotImplementedError

    def _log_setup(self) -> None:
        raise NotImplementedError

    def _epoch_lengths(self) -> list[int]:
        raise NotImplementedError

    def _epoch_lrs(self, epoch: int) -> list[float]:
        raise NotImplementedError

    def _step(self, batch: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def _evaluate(self) -> Any:
        raise NotImplementedError

    def _save_final_model(self) -> Path | None:
        raise NotImplementedError

    def _result(self, final_path: Path | None, preempted: bool) -> Any:
        raise NotImplementedError
