"""The supervised fine-tuning loop: P x K batches, CE + triplet, per-epoch warm-up cosine, exact resume.

One run writes into ``train.output_dir``: ``config.yaml``, ``log.txt``, ``metrics.jsonl`` (``split``
"train" every ``train.log_period`` iterations, "eval" after each evaluation), TensorBoard events in
``tb/``, ``checkpoint.pth`` (full training state, every ``train.checkpoint_period`` epochs and when the
run stops) and ``model_final.pth`` (see :mod:`passreid.finetune.checkpoints`).

Exact resume: the checkpoint holds model, optimizer, scheduler, AMP scaler, epoch, iteration, every
rank's RNG state and the sampler position; each epoch's DataLoader draws from its own generator seeded
by (seed, rank, epoch). With ``data.num_workers > 0`` the augmentation of a run resumed *mid-epoch*
restarts from fresh worker seeds (see :mod:`passreid.engine`); at epoch boundaries, or with
``num_workers=0``, the continuation is exact.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from passreid import dist
from passreid.config import config_to_dict, save_config
from passreid.data.samplers import RandomIdentitySampler
from passreid.engine import (Checkpointer, MetricsWriter, PreemptionGuard, ProgressLogger, atomic_save, autocast_for,
                             build_checkpoint, check_finite, gather_rng_states, make_output_dir, output_layout,
                             restore_checkpoint, seed_everything, setup_logging, unwrap_model)
from passreid.finetune.checkpoints import build_final_checkpoint
from passreid.finetune.config import FinetuneConfig, validate_config
from passreid.finetune.data import FinetuneData, build_train_loader, build_train_set, load_finetune_data
from passreid.finetune.evaluator import EvalResult, evaluate_model, format_result
from passreid.finetune.methods import SecondPass, build_criterion, build_model, get_method
from passreid.finetune.optim import build_lr_scheduler, build_optimizer, schedule_epoch

__all__ = ["FinetuneTrainer", "TrainResult", "resolve_device", "run_training"]

logger = logging.getLogger("passreid.finetune")

# Every other field of a training batch (e.g. ``masks``) is passed to the model's forward by name.
_STANDARD_BATCH_KEYS = frozenset({"img", "pid", "camid", "index"})


@dataclass
class TrainResult:
    """Where a run ended. ``final_metrics`` (rank 0 only) are the last evaluation's scalars."""

    output_dir: Path
    iterations: int
    epochs_completed: int
    final_metrics: dict[str, float] | None
    final_model: Path | None
    preempted: bool = False  # stopped by SIGUSR1/SIGTERM with checkpoint.pth written: requeue and resume


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; otherwise the given device."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={spec!r} but CUDA is not available")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


class FinetuneTrainer:
    """Builds everything a run needs from the config, then :meth:`run` trains, evaluates and saves."""

    def __init__(self, cfg: FinetuneConfig, resume: bool = True) -> None:
        self.cfg = validate_config(cfg)
        self.env = dist.init_distributed()
        self.rank, self.world_size = self.env.rank, self.env.world_size
        self.device = resolve_device(cfg.train.device, self.env.local_rank)
        self.output_dir = make_output_dir(cfg.train.output_dir)
        setup_logging(self.output_dir, rank=self.rank)
        if self.rank == 0:
            save_config(cfg, output_layout(self.output_dir).config)
        seed_everything(cfg.train.seed + self.rank)

        self.data: FinetuneData = load_finetune_data(cfg)
        self.checkpointer = Checkpointer(self.output_dir, is_main=self.rank == 0)
        resuming = resume and self.checkpointer.has_checkpoint()
        # A resumed run takes every weight from the checkpoint: model.pretrained is not read again.
        self.model = build_model(cfg, self.data.num_classes, self.data.num_cameras,
                                 load_weights=not resuming).to(self.device)
        self.criterion = build_criterion(cfg).to(self.device)
        self.second_pass = self._build_second_pass()
        self.optimizer = build_optimizer(self.model, cfg.optim,
                                         exclude=self.second_pass.names if self.second_pass is not None else ())
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optim, cfg.train.epochs)
        self.amp = autocast_for(self.device, cfg.train.precision)
        self.train_set = build_train_set(self.data.train.train, cfg)
        self.sampler = RandomIdentitySampler([item.pid for item in self.data.train.train], cfg.data.batch_size,
                                             cfg.data.num_instances, seed=cfg.train.seed, rank=self.rank,
                                             world_size=self.world_size)
        self.epoch, self.iteration, self.pending_sampler_state = 0, 0, None
        self.last_eval_iteration: int | None = None
        self.last_metrics: dict[str, float] | None = None
        self.preempted = False
        self.guard = PreemptionGuard()  # inert until run() installs the signal handlers
        if resuming:
            self._resume()
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.metrics = MetricsWriter(self.output_dir, enabled=self.rank == 0,
                                     purge_step=self.iteration if self.iteration else None)
        self._log_setup()

    # ------------------------------------------------------------------ set-up
    def _build_second_pass(self) -> SecondPass | None:
        """The method's second-pass parameters and optimizer (e.g. DPM's mask generator), if it has one."""
        builder = get_method(self.cfg.method).build_second_pass
        if builder is None:
            return None
        second = builder(self.model, self.cfg)
        named = dict(self.model.named_parameters())
        self.second_pass_params = [named[name] for name in sorted(second.names)]
        logger.info("second pass: %d parameter tensors (%.2fM) stepped by their own %s after each main step",
                    len(self.second_pass_params), sum(p.numel() for p in self.second_pass_params) / 1e6,
                    type(second.optimizer).__name__)
        return second

    def _resume(self) -> None:
        state = self.checkpointer.load()
        if state is None:
            return
        info = restore_checkpoint(state, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                  scaler=self.amp.scaler, rank=self.rank, world_size=self.world_size)
        self.epoch, self.iteration, self.pending_sampler_state = info.epoch, info.iteration, info.sampler
        if self.second_pass is not None:
            if "second_pass_optimizer" not in info.extra:
                raise RuntimeError(f"{self.checkpointer.path()} has no second-pass optimizer state, but method "
                                   f"{self.cfg.method!r} needs one: it was written by a run of another method")
            self.second_pass.optimizer.load_state_dict(info.extra["second_pass_optimizer"])
        self._warn_config_changes(info.config or {})
        self.last_metrics = info.extra.get("last_metrics")
        self.last_eval_iteration = info.extra.get("last_eval_iteration")
        logger.info("resumed from %s: epoch %d, iteration %d, sampler position %s",
                    self.checkpointer.path(), self.epoch, self.iteration, self.pending_sampler_state)

    def _warn_config_changes(self, saved: dict[str, Any]) -> None:
        """Resuming with a changed config is allowed (e.g. more epochs) but never silent."""
        current = config_to_dict(self.cfg)
        changed = [f"{section}.{key}: {saved[section][key]!r} -> {value!r}"
                   for section, values in current.items() if isinstance(values, dict) and section in saved
                   for key, value in values.items()
                   if key != "output_dir" and saved[section].get(key) != value]
        if changed:
            logger.warning("resuming with a config that differs from the checkpoint's: %s", "; ".join(changed))

    def _log_setup(self) -> None:
        model = unwrap_model(self.model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("method %s: %s %dx%d stride %d, head %s, feature dim %d, SIE %s, JPM %s, %.2fM trainable "
                    "parameters; %d process(es) on %s, precision %s", self.cfg.method, self.cfg.model.arch,
                    *self.cfg.model.img_size, self.cfg.model.stride_size, self.cfg.model.head,
                    getattr(model, "feature_dim", -1), self.cfg.model.sie_camera, self.cfg.model.jpm,
                    trainable / 1e6, self.world_size, self.device, self.cfg.train.precision)

    def total_iterations(self) -> int:
        """Optimizer steps of the whole run (the P x K epoch length varies slightly between epochs)."""
        total = sum(len(self.sampler.global_batches(epoch)) for epoch in range(self.cfg.train.epochs))
        if self.cfg.train.max_iters:
            total = min(total, self.cfg.train.max_iters)
        if total == 0:
            raise ValueError("the training set yields no P x K batch: fewer identities than batch_size / "
                             "num_instances; lower data.batch_size")
        return total

    # ------------------------------------------------------------------ loop
    def run(self) -> TrainResult:
        """Train until ``train.epochs`` (or ``train.max_iters``), evaluate, write ``model_final.pth``.

        On a pre-emption signal (SIGUSR1/SIGTERM) it writes ``checkpoint.pth`` after the current
        iteration and returns with ``preempted=True`` instead (no evaluation, no final model).
        """
        self.guard = PreemptionGuard.install()
        try:
            return self._run()
        finally:
            self.guard.uninstall()

    def _run(self) -> TrainResult:
        cfg = self.cfg
        progress = ProgressLogger(self.total_iterations(), cfg.train.log_period, logger)
        for epoch in range(self.epoch, cfg.train.epochs):
            if self._reached_max_iters():
                break
            finished = self._train_epoch(epoch, progress)
            if not finished:
                break
            self.epoch = epoch + 1
            last = self.epoch == cfg.train.epochs or self._reached_max_iters()
            if self.epoch % cfg.train.checkpoint_period == 0 or last or self.preempted:
                self._save_checkpoint({"epoch": self.epoch, "position": 0})
            if self.preempted:
                break
            if self.epoch % cfg.eval.period == 0 or last:
                self._evaluate()
        if self.preempted:
            logger.info("stopped by a pre-emption signal at iteration %d; checkpoint written, resume to continue",
                        self.iteration)
            self.metrics.close()
            return TrainResult(self.output_dir, self.iteration, self.epoch, self.last_metrics, None, preempted=True)
        if self.last_eval_iteration != self.iteration:
            self._evaluate()
        final_path = self._save_final_model()
        self.metrics.close()
        logger.info("fine-tuning finished at epoch %d, iteration %d", self.epoch, self.iteration)
        return TrainResult(self.output_dir, self.iteration, self.epoch, self.last_metrics, final_path)

    def _reached_max_iters(self) -> bool:
        return bool(self.cfg.train.max_iters) and self.iteration >= self.cfg.train.max_iters

    def _train_epoch(self, epoch: int, progress: ProgressLogger) -> bool:
        """One epoch (or its remainder after a resume); False when stopped mid-epoch by ``max_iters``."""
        self.scheduler.step(schedule_epoch(epoch, self.cfg.optim.lr_stepping))
        self.sampler.set_epoch(epoch)
        if self.pending_sampler_state is not None and self.pending_sampler_state["epoch"] == epoch:
            self.sampler.load_state_dict(self.pending_sampler_state)
        self.pending_sampler_state = None
        loader = build_train_loader(self.train_set, self.sampler, self.cfg, epoch, self.rank,
                                    pin_memory=self.device.type == "cuda")
        self.model.train()
        batches = 0
        for batch in loader:
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
            self._save_checkpoint(position)
            reason = "a pre-emption signal" if self.preempted else "train.max_iters"
            logger.info("stopped at iteration %d (%s) in epoch %d; checkpoint saved", self.iteration, reason,
                        epoch + 1)
            return False
        return True

    def _step(self, batch: dict[str, Any]) -> dict[str, float]:
        images = batch["img"].to(self.device, non_blocking=True)
        pids = torch.as_tensor(batch["pid"]).to(self.device, non_blocking=True)
        camids = torch.as_tensor(batch["camid"]).to(self.device, non_blocking=True)
        extras = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()
                  if key not in _STANDARD_BATCH_KEYS}
        with self.amp.autocast():
            output = self.model(images, camids=camids, **extras)
            terms = self.criterion(output, pids)
        loss = terms["loss"]
        check_finite(loss, self.iteration, extra={k: v for k, v in terms.items() if k != "loss"})
        self.optimizer.zero_grad(set_to_none=True)
        if self.amp.scaler is not None:
            self.amp.scaler.scale(loss).backward()
            self.amp.scaler.step(self.optimizer)
            self.amp.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        values = {key: float(value.detach()) for key, value in terms.items()}
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.second_pass is not None:
            values["second_pass_loss"] = self._second_pass_step(images, pids, camids, extras)
        return values

    def _second_pass_step(self, images: torch.Tensor, pids: torch.Tensor, camids: torch.Tensor,
                          extras: dict[str, Any]) -> float:
        """Recompute forward and loss with the updated weights and step only the second-pass parameters.

        Gradients come from ``torch.autograd.grad`` w.r.t. those parameters only (nothing else is
        back-propagated or touched), through the unwrapped model; under DDP they are averaged by hand.
        """
        model = unwrap_model(self.model)
        optimizer = self.second_pass.optimizer
        with self.amp.autocast():
            terms = self.criterion(model(images, camids=camids, **extras), pids)
        loss = terms["loss"]
        check_finite(loss, self.iteration, extra={f"second_pass_{k}": v for k, v in terms.items() if k != "loss"})
        scaled = self.amp.scaler.scale(loss) if self.amp.scaler is not None else loss
        grads = torch.autograd.grad(scaled, self.second_pass_params, allow_unused=True)
        for param, grad in zip(self.second_pass_params, grads):
            param.grad = None if grad is None else (dist.all_reduce_mean(grad) if self.world_size > 1 else grad)
        if self.amp.scaler is not None:
            self.amp.scaler.step(optimizer)
            self.amp.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # ------------------------------------------------------------------ outputs
    def _save_checkpoint(self, sampler_position: dict[str, int]) -> None:
        rng_states = gather_rng_states()  # collective: every rank calls it
        extra = {"last_metrics": self.last_metrics, "last_eval_iteration": self.last_eval_iteration}
        if self.second_pass is not None:
            extra["second_pass_optimizer"] = self.second_pass.optimizer.state_dict()
        state = build_checkpoint(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                 scaler=self.amp.scaler, epoch=self.epoch, iteration=self.iteration,
                                 sampler=sampler_position, config=config_to_dict(self.cfg), extra=extra,
                                 rng_states=rng_states)
        self.checkpointer.save(state)

    def _evaluate(self) -> EvalResult | None:
        model = unwrap_model(self.model)
        result = evaluate_model(model, self.data.test, tuple(self.cfg.model.img_size), self.cfg, self.device,
                                autocast=self.amp.autocast, rank=self.rank, world_size=self.world_size)
        self.last_eval_iteration = self.iteration
        if result is not None:
            self.last_metrics = result.metrics
            self.metrics.write(self.iteration, split="eval", epoch=self.epoch, **result.metrics)
            logger.info("evaluation on %s after epoch %d (iteration %d):\n%s", self.data.test.name, self.epoch,
                        self.iteration, format_result(result))
        return result

    def _save_final_model(self) -> Path | None:
        path = None
        if self.rank == 0:
            final = build_final_checkpoint(self.model, self.cfg, self.data.num_classes, self.data.num_cameras)
            final["meta"]["final_metrics"] = self.last_metrics
            path = atomic_save(final, output_layout(self.output_dir).final_model)
            logger.info("wrote %s", path)
        dist.barrier()
        return path


def run_training(cfg: FinetuneConfig, resume: bool = True) -> TrainResult:
    """Fine-tune with ``cfg`` (auto-resuming from ``<output_dir>/checkpoint.pth`` unless ``resume=False``)."""
    previous_threads = torch.get_num_threads()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    try:
        return FinetuneTrainer(cfg, resume=resume).run()
    finally:
        torch.set_num_threads(previous_threads)
