"""The one training loop of every stage: PASS pre-training, supervised fine-tuning, Cluster-Contrast USL/UDA.

:class:`Trainer` counts iterations (optimizer steps); an epoch is a view of them (the batches one pass of
the sampler gives). It owns what every run does the same way: process set-up (distributed env, device,
precision, output folder, logging, saved config, seeds), the per-iteration schedules (``schedules.npz``),
the loop with its checkpoint and evaluation periods, ``train.max_iters`` and the pre-emption stop, the
checkpoint and its one resume path. A stage supplies its model, data, step and outputs through the hooks
listed in the class docstring.
"""
from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from passreid import dist
from passreid.config import config_to_dict, save_config
from passreid.data.samplers import BatchShardedSampler, SampleSeeds, SeededSamples
from passreid.engine import (CheckpointStateError, Checkpointer, MetricsWriter, PreemptionGuard, ProgressLogger,
                             autocast_for, batches_until_preempted, build_checkpoint, gather_rng_states, make_output_dir,
                             output_layout, preemption_guard, restore_checkpoint, run_precision, save_schedules,
                             seed_everything, select_device, setup_logging)
from passreid.engine.logger import run_position
from passreid.engine.preemption import PreemptibleDataLoader
from passreid.seeding import worker_init_fn

__all__ = ["StopReason", "Trainer", "build_train_loader", "loader_generator", "torch_threads"]


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



# Why a run left the loop: every epoch done, ``train.max_iters`` reached, or a pre-emption signal.
StopReason = Literal["done", "max_iters", "preempted"]


class Trainer:
    """Iteration-based training with per-iteration schedules, periodic checkpoints and evaluations, exact
    resume and the pre-emption stop.

    The config needs ``train.{device, output_dir, seed, epochs, max_iters, checkpoint_period,
    checkpoint_period_iters, log_period, precision}``. The set-up resolves the training precision and the
    evaluation precision (:meth:`_eval_precision_key`) for the device, logs them and writes them at the top
    of ``config.yaml``; training steps run under ``amp`` (autocast + GradScaler), evaluation under ``eval_amp``.

    One iteration: :meth:`_apply_schedules` writes the iteration's values into the optimizer, :meth:`_step`
    trains on one batch, then the loop counts it, logs it (:meth:`_after_step`), writes ``checkpoint.pth``
    every ``train.checkpoint_period_iters`` iterations and stops at ``train.max_iters`` or on a pre-emption
    signal (``checkpoint.pth`` at the sampler's position, so a resumed run continues with the next batch).
    At an epoch's end: :meth:`_finish_epoch`, ``checkpoint.pth`` every ``train.checkpoint_period`` epochs and
    at the last, :meth:`_evaluate` when :meth:`_evaluation_due`. At the end: :meth:`_complete`.

    A stage sets ``log`` (its logger) and ``stage_name`` and implements:

    - ``_build(resuming)``: data, ``model`` (what the checkpoint stores), ``optimizer``, and what
      :meth:`_epoch_batches` reads (by default ``train_set`` and ``sampler``, ``None`` until
      ``_prepare_epoch``); when ``resuming`` no pretrained weight is read.
    - ``_build_schedules()``: the run's per-iteration arrays (``{"lr": (iterations, groups), ...}``), kept in
      the run folder as ``schedules.npz``. :meth:`epoch_schedules` builds the one of a stage whose published
      recipe steps per epoch from ``_epoch_lengths()`` and ``_epoch_lrs(epoch)``.
    - ``_step(batch)``: one optimizer step -> scalars with ``loss`` and ``lr``: zero the gradients, the stage's
      meta-architecture ``forward_backward`` (forward, loss, backward), :meth:`_optimizer_step`.
    - ``_wrap_distributed()``, ``_log_setup()``, ``_evaluate()`` (sets ``last_metrics`` /
      ``last_eval_iteration``), ``_save_final_model()`` and ``_result(final_path, preempted)``.

    Optional hooks: ``_before_epochs()``, ``_prepare_epoch(epoch)`` (e.g. re-cluster), ``_finish_epoch(epoch)``,
    ``_after_step(batch, terms, epoch)``, ``_checkpoint_extra(stopped_in_epoch)`` / ``_restore_extra(extra)``
    (the stage's own checkpoint state), ``_check_resumable(state)``, ``_decorate_checkpoint(state)``,
    ``_keep_checkpoint_copy()``, ``_complete(stop)``, ``_resume_note()``, ``loader_config`` and ``train_module``;
    ``_epoch_batches(epoch)`` / ``_epoch_position(epoch, batches)`` for a stage with its own batch source.
    """

    log = logging.getLogger("passreid")
    stage_name = "training"
    # Keys that say how this invocation runs rather than what is trained: changing them on resume is expected.
    run_control_keys = ("train.max_iters", "train.output_dir")

    def __init__(self, cfg: Any, resume: bool = True) -> None:
        self.cfg = cfg
        self._set_up_process()
        self._init_loop_state()
        resuming = resume and self.checkpointer.has_checkpoint()
        if not resume and self.checkpointer.has_checkpoint():
            self.log.warning("--no-resume: ignoring %s; it will be overwritten", self.checkpointer.path())
        self._build(resuming)
        self.schedules = self._build_schedules()
        if self.rank == 0:
            save_schedules(output_layout(self.output_dir).schedules, **self.schedules)
        if resuming:
            self._resume()
        if self.world_size > 1:
            self._wrap_distributed()
        self.metrics = MetricsWriter(self.output_dir, enabled=self.rank == 0,
                                     purge_step=self.iteration + 1 if self.iteration else None)
        self._log_setup()

    def _set_up_process(self) -> None:
        """Distributed env, device, precision, output folder with its log and saved config, seeds, checkpointer."""
        train = self.cfg.train
        self.env = dist.init_distributed(timeout=datetime.timedelta(minutes=train.dist_timeout_min))
        self.rank, self.world_size = self.env.rank, self.env.world_size
        self.device = select_device(train.device, self.env.local_rank)
        eval_key = self._eval_precision_key()
        self.precision = run_precision(self.device, train.precision, _config_value(self.cfg, eval_key), eval_key)
        self.amp = autocast_for(self.device, self.precision.train)
        self.eval_amp = autocast_for(self.device, self.precision.eval)
        self.output_dir = make_output_dir(train.output_dir)
        setup_logging(self.output_dir, rank=self.rank)
        self.log.info("precision on %s: %s", self.device, self.precision.describe())
        if self.rank == 0:
            save_config(self.cfg, output_layout(self.output_dir).config,
                        comment=f"precision that ran on {self.device}: {self.precision.describe()}")
        seed_everything(train.seed + self.rank)
        self.checkpointer = Checkpointer(self.output_dir, is_main=self.rank == 0,
                                         keep_every=self._keep_checkpoint_every())

    def _init_loop_state(self) -> None:
        """Where a fresh run starts; :meth:`_resume` overwrites it from the checkpoint."""
        self.epoch, self.iteration = 0, 0
        self.pending_sampler_state: dict[str, int] | None = None
        self.last_eval_iteration: int | None = None
        self.last_metrics: dict[str, float] | None = None
        self.guard = PreemptionGuard()  # inert until run() installs the signal handlers

    # ------------------------------------------------------------------ hooks with defaults
    @property
    def loader_config(self) -> Any:
        """The config whose ``train.seed`` and ``data.num_workers`` the training loader uses."""
        return self.cfg

    @property
    def train_module(self) -> nn.Module:
        return self.model

    def _eval_precision_key(self) -> str:
        """The config key of the evaluation precision (features for tests, clustering, monitors)."""
        return "eval.precision"

    def _keep_checkpoint_every(self) -> int | None:
        """Keep a named copy of the checkpoint every this many epochs (``None``: only ``checkpoint.pth``)."""
        return None

    def _keep_checkpoint_copy(self) -> bool:
        """Whether the epoch-end checkpoint just due also keeps a named copy."""
        return False

    def _before_epochs(self) -> None:
        """Runs once before the loop."""

    def _prepare_epoch(self, epoch: int) -> None:
        """Runs before each (possibly resumed) epoch."""

    def _finish_epoch(self, epoch: int) -> None:
        """Runs after each completed epoch (``self.epoch`` is already ``epoch + 1``), before its checkpoint."""

    def _evaluation_due(self, last: bool) -> bool:
        """Whether to evaluate after the epoch just finished (``last``: the run's last epoch)."""
        return self.epoch % self.cfg.eval.period == 0 or last

    def _after_step(self, batch: Any, terms: dict[str, float], epoch: int) -> None:
        """Log the step just taken (``self.iteration`` steps done): a "train" record every ``train.log_period``."""
        if self.iteration % self.cfg.train.log_period == 0:
            self.metrics.write(self.iteration, split="train", epoch=epoch + 1, **terms)

    def _checkpoint_extra(self, stopped_in_epoch: int | None) -> dict[str, Any]:
        """The trainer's own checkpoint state; ``stopped_in_epoch`` is set for a mid-epoch checkpoint."""
        return {}

    def _decorate_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint dict as written (e.g. with aliases in a published layout)."""
        return state

    def _check_resumable(self, state: dict[str, Any]) -> None:
        """Raise :class:`CheckpointStateError` when this run cannot continue ``state``."""

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        """Reads back what :meth:`_checkpoint_extra` saved."""

    def _resume_note(self) -> str:
        return ""

    def _ddp(self, module: nn.Module, **options: Any) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **options)

    # ------------------------------------------------------------------ schedules
    def total_iterations(self) -> int:
        """Optimizer steps of the whole run (``train.max_iters`` included)."""
        return self._clamp_to_max_iters(len(self.schedules["lr"]))

    def _clamp_to_max_iters(self, total: int) -> int:
        return min(total, self.cfg.train.max_iters) if self.cfg.train.max_iters else total

    def epoch_schedules(self) -> dict[str, np.ndarray]:
        """``lr``: every param group's rate at every iteration, ``(iterations, groups)``, constant within an
        epoch (the published recipes step per epoch), up to ``train.max_iters``; ``epoch``: each iteration's
        1-based epoch. For :meth:`_build_schedules` of a stage with ``_epoch_lengths`` / ``_epoch_lrs``."""
        lengths = self._epoch_lengths()
        epochs = np.repeat(np.arange(1, len(lengths) + 1), lengths)
        rates = np.array([self._epoch_lrs(epoch) for epoch in range(len(lengths))], dtype=np.float64)
        total = self._clamp_to_max_iters(int(sum(lengths)))
        return {"lr": np.repeat(rates, lengths, axis=0)[:total], "epoch": epochs[:total]}

    def _apply_schedules(self, iteration: int) -> None:
        """Write iteration ``iteration``'s values into the optimizer (default: each group's ``lr``)."""
        for group, lr in zip(self.optimizer.param_groups, self.schedules["lr"][iteration]):
            group["lr"] = float(lr)

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        state = self.checkpointer.load()
        if state is None:
            return
        self._check_resumable(state)
        self._check_mid_epoch_world_size(state)
        info = restore_checkpoint(state, model=self.model, optimizer=self.optimizer, scaler=self.amp.scaler,
                                  rank=self.rank, world_size=self.world_size)
        self.epoch, self.iteration, self.pending_sampler_state = info.epoch, info.iteration, info.sampler
        position = (self.pending_sampler_state or {}).get("position", 0)
        self.last_metrics = info.extra.get("last_metrics")
        self.last_eval_iteration = info.extra.get("last_eval_iteration")
        self._restore_extra(info.extra)
        self._warn_config_changes(info.config or {})
        self.log.info("resumed from %s at iteration %d, %s (sampler position %d)%s", self.checkpointer.loaded_from,
                      self.iteration, run_position(self.epoch, position), position, self._resume_note())

    def _check_mid_epoch_world_size(self, state: dict[str, Any]) -> None:
        """A mid-epoch position counts this rank's share of the epoch, which depends on the number of
        processes: continuing it with another number would repeat or skip data, so it is refused (a
        checkpoint taken at an epoch boundary resumes on any number)."""
        rng, sampler = state.get("rng"), state.get("sampler") or {}
        saved_ranks = len(rng) if isinstance(rng, (list, tuple)) else 1
        position = int(sampler.get("position", 0)) if isinstance(sampler, dict) else 0
        if position and saved_ranks != self.world_size:
            raise CheckpointStateError(
                f"{self.checkpointer.path()} was written in the middle of epoch {int(sampler.get('epoch', 0)) + 1} "
                f"by {saved_ranks} process(es); it can only continue on {saved_ranks} (this run has "
                f"{self.world_size}): each process's position in the epoch depends on their number. Resume "
                f"with {saved_ranks} process(es), or start fresh with --no-resume.")

    def _warn_config_changes(self, saved: dict[str, Any]) -> None:
        """Resuming with a changed config is allowed (e.g. more epochs) but never silent."""
        current = config_to_dict(self.cfg)
        changed = [f"{section}.{key}: {saved[section][key]!r} -> {value!r}"
                   for section, values in current.items() if isinstance(values, dict) and section in saved
                   for key, value in values.items()
                   if key in saved[section] and saved[section][key] != value
                   and f"{section}.{key}" not in self.run_control_keys]
        if changed:
            self.log.warning("resuming with a config that differs from the checkpoint's: %s", "; ".join(changed))

    # ------------------------------------------------------------------ loop
    def run(self) -> Any:
        """Train until ``train.epochs`` (or ``train.max_iters``), then :meth:`_complete` (by default: evaluate
        and write ``model_final.pth``).

        On a pre-emption signal (SIGUSR1/SIGTERM) it writes ``checkpoint.pth`` after the current
        iteration and returns ``_result(None, preempted=True)`` instead (no evaluation, no final model).
        """
        with preemption_guard() as self.guard:
            return self._run()

    def _run(self) -> Any:
        self._before_epochs()
        progress = ProgressLogger(self.total_iterations(), self.cfg.train.log_period, self.log)
        stop = self._run_epochs(progress)
        if stop == "preempted":
            self.log.info("stopped by a pre-emption signal at iteration %d; checkpoint written, resume to continue",
                          self.iteration)
            self.metrics.close()
            return self._result(None, preempted=True)
        return self._complete(stop)

    def _complete(self, stop: StopReason) -> Any:
        """After the last epoch or at ``train.max_iters``: the final evaluation and model."""
        if self.last_eval_iteration != self.iteration:
            self._evaluate()
        final_path = self._save_final_model()
        self.metrics.close()
        self.log.info("%s finished at epoch %d, iteration %d", self.stage_name, self.epoch, self.iteration)
        return self._result(final_path, preempted=False)

    def _run_epochs(self, progress: ProgressLogger) -> StopReason:
        """Epochs from ``self.epoch`` on, each checkpointed and evaluated at its period."""
        train = self.cfg.train
        for epoch in range(self.epoch, train.epochs):
            if self._reached_max_iters():
                return "max_iters"
            self._prepare_epoch(epoch)
            stop = self._train_epoch(epoch, progress)
            if stop is not None:
                return stop
            self.epoch = epoch + 1
            self._finish_epoch(epoch)
            last = self.epoch == train.epochs or self._reached_max_iters()
            if self.epoch % train.checkpoint_period == 0 or last:
                self._save_checkpoint({"epoch": self.epoch, "position": 0}, keep_copy=self._keep_checkpoint_copy())
            if self._evaluation_due(last):
                self._evaluate()
        return "max_iters" if self.epoch < train.epochs else "done"  # the loop ends early only at max_iters

    def _reached_max_iters(self) -> bool:
        return bool(self.cfg.train.max_iters) and self.iteration >= self.cfg.train.max_iters

    def _train_epoch(self, epoch: int, progress: ProgressLogger) -> StopReason | None:
        """One epoch (or its remainder after a resume). Returns ``None`` when the epoch is complete, else why
        it stopped early, with ``checkpoint.pth`` written at the sampler's position. ``train.max_iters`` at the
        epoch's last batch lets the epoch end normally; a pre-emption signal stops at once."""
        every = self.cfg.train.checkpoint_period_iters
        self.train_module.train()
        batches, stop, saved = 0, None, False
        for batch in batches_until_preempted(self._epoch_batches(epoch)):
            self._apply_schedules(self.iteration)
            terms = self._step(batch)
            self.iteration += 1
            batches += 1
            progress.update(self.iteration - 1, **terms)
            self._after_step(batch, terms, epoch)
            saved = bool(every) and self.iteration % every == 0
            if saved:
                self._save_checkpoint(self._epoch_position(epoch, batches), stopped_in_epoch=epoch)
            if self.guard.requested():
                stop = "preempted"
                break
            if self._reached_max_iters():
                stop = "max_iters"
                break
        position = self._epoch_position(epoch, batches)
        complete = position["position"] >= self._epoch_size(epoch)
        if stop is None and not complete:  # batches_until_preempted ended the epoch after a signal this rank got
            stop = "preempted"
        if stop is None or (stop == "max_iters" and complete):
            return None
        if not saved:
            self._save_checkpoint(position, stopped_in_epoch=epoch)
        self.log.info("stopped at iteration %d (%s) in epoch %d; checkpoint saved", self.iteration,
                      "a pre-emption signal" if stop == "preempted" else "train.max_iters", epoch + 1)
        return stop

    def _epoch_batches(self, epoch: int) -> Iterable[Any]:
        """The epoch's batches from the resumed sampler position on (default: the P x K loader of
        ``train_set`` / ``sampler``)."""
        self.sampler.set_epoch(epoch)
        if self.pending_sampler_state is not None and self.pending_sampler_state["epoch"] == epoch:
            self.sampler.load_state_dict(self.pending_sampler_state)
        self.pending_sampler_state = None
        cfg = self.loader_config
        return build_train_loader(self.train_set, self.sampler, cfg.train.seed, cfg.data.num_workers, epoch,
                                  self.rank, pin_memory=self.device.type == "cuda")

    def _epoch_position(self, epoch: int, batches: int) -> dict[str, int]:
        """The sampler state (``{"epoch", "position"}``) after ``batches`` batches of this pass over the epoch."""
        return self.sampler.state_dict(consumed=batches * self.sampler.per_rank_batch_size)

    def _epoch_size(self, epoch: int) -> int:
        """This rank's sampler positions in ``epoch`` (the position at which it is complete)."""
        return len(self.sampler)

    def _optimizer_step(self) -> None:
        """Step the optimizer on the gradients a meta-architecture's ``forward_backward`` left (through the AMP
        scaler: step and update)."""
        if self.amp.scaler is not None:
            self.amp.scaler.step(self.optimizer)
            self.amp.scaler.update()
        else:
            self.optimizer.step()

    # ------------------------------------------------------------------ outputs
    def _save_checkpoint(self, sampler_position: dict[str, int], stopped_in_epoch: int | None = None,
                         keep_copy: bool = False) -> None:
        """Write ``checkpoint.pth`` (collective: every rank calls it, rank 0 writes)."""
        rng_states = gather_rng_states()
        extra = {"last_metrics": self.last_metrics, "last_eval_iteration": self.last_eval_iteration,
                 **self._checkpoint_extra(stopped_in_epoch)}
        state = build_checkpoint(model=self.model, optimizer=self.optimizer, scaler=self.amp.scaler,
                                 epoch=self.epoch, iteration=self.iteration, sampler=sampler_position,
                                 config=config_to_dict(self.cfg), extra=extra, rng_states=rng_states)
        path = self.checkpointer.save(self._decorate_checkpoint(state), step=self.epoch if keep_copy else None)
        if path is not None:
            self.log.info("saved %s (epoch %d, iteration %d)", path, self.epoch, self.iteration)

    # ------------------------------------------------------------------ required hooks
    def _build(self, resuming: bool) -> None:
        raise NotImplementedError

    def _build_schedules(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _wrap_distributed(self) -> None:
        raise NotImplementedError

    def _log_setup(self) -> None:
        raise NotImplementedError

    def _epoch_lengths(self) -> list[int]:
        raise NotImplementedError

    def _epoch_lrs(self, epoch: int) -> list[float]:
        raise NotImplementedError

    def _step(self, batch: Any) -> dict[str, float]:
        raise NotImplementedError

    def _evaluate(self) -> Any:
        raise NotImplementedError

    def _save_final_model(self) -> Path | None:
        raise NotImplementedError

    def _result(self, final_path: Path | None, preempted: bool) -> Any:
        raise NotImplementedError


def _config_value(cfg: Any, dotted: str) -> Any:
    """``cfg.<section>.<key>`` for ``"section.key"``."""
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)
