"""The supervised fine-tuning loop: P x K batches, CE + triplet, per-epoch warm-up cosine, exact resume.

One run writes into ``train.output_dir``: ``config.yaml``, ``log.txt``, ``metrics.jsonl`` (``split``
"train" every ``train.log_period`` iterations, "eval" after each evaluation), TensorBoard events in
``tb/``, ``checkpoint.pth`` (full training state, every ``train.checkpoint_period`` epochs and when the
run stops) and ``model_final.pth`` (see :mod:`passreid.finetune.checkpoints`).

Exact resume: the checkpoint holds model, optimizer, AMP scaler, epoch, iteration, every rank's RNG state
and the sampler position; each epoch's DataLoader draws from its own generator seeded by (seed, rank, epoch)
and each sample's augmentation from its place in the epoch, so a resumed run continues with the same
batches, with loader workers too (:class:`passreid.engine.trainer.Trainer`).

With N > 1 processes ``train.ddp_batch: global`` (default) gathers the model outputs of every process before the
loss and synchronises BatchNorm, so the run computes the 1-process loss and gradient of the global batch;
``local`` keeps each process's shard (see ``finetune/README.md``, "Distributed training").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from passreid import dist
from passreid.config import ConfigError
from passreid.data.samplers import RandomIdentitySampler
from passreid.engine import (CheckpointStateError, atomic_save, check_finite, output_layout, preemption_guard,
                             unwrap_model)
from passreid.engine.trainer import Trainer, torch_threads
from passreid.eval.evaluator import EvalResult, evaluate_model, format_result
from passreid.finetune.checkpoints import build_final_checkpoint
from passreid.finetune.config import FinetuneConfig, validate_config
from passreid.finetune.data import FinetuneData, build_train_set, load_finetune_data
from passreid.finetune.methods import SecondPass, build_criterion, build_model, get_method
from passreid.finetune.optim import build_optimizer, epoch_learning_rates

__all__ = ["FinetuneTrainer", "TrainResult", "run_training"]

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


class FinetuneTrainer(Trainer):
    """Builds everything a run needs from the config, then :meth:`run` trains, evaluates and saves."""

    log = logger
    stage_name = "fine-tuning"

    def __init__(self, cfg: FinetuneConfig, resume: bool = True) -> None:
        super().__init__(validate_config(cfg), resume)

    # ------------------------------------------------------------------ set-up
    def _build(self, resuming: bool) -> None:
        cfg = self.cfg
        self.data: FinetuneData = load_finetune_data(cfg)
        # A resumed run takes every weight from the checkpoint: model.pretrained is not read again.
        self.model = build_model(cfg, self.data.num_classes, self.data.num_cameras,
                                 load_weights=not resuming).to(self.device)
        self.criterion = build_criterion(cfg).to(self.device)
        self.second_pass = self._build_second_pass()
        self.optimizer = build_optimizer(self.model, cfg.optim,
                                         exclude=self.second_pass.names if self.second_pass is not None else ())
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]  # what the schedule scales
        self.train_set = build_train_set(self.data.train.train, cfg)
        self.sampler = RandomIdentitySampler([item.pid for item in self.data.train.train], cfg.data.batch_size,
                                             cfg.data.num_instances, seed=cfg.train.seed, rank=self.rank,
                                             world_size=self.world_size)

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

    def _wrap_distributed(self) -> None:
        if self.global_batch:
            self.model = dist.convert_sync_batchnorm(self.model, self.device)
        self.model = self._ddp(self.model)

    @property
    def global_batch(self) -> bool:
        """True when N > 1 processes compute the loss and BatchNorm statistics of the whole global batch."""
        return self.world_size > 1 and self.cfg.train.ddp_batch == "global"

    def _checkpoint_extra(self, stopped_in_epoch: int | None) -> dict[str, Any]:
        if self.second_pass is None:
            return {}
        return {"second_pass_optimizer": self.second_pass.optimizer.state_dict()}

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        if self.second_pass is None:
            return
        if "second_pass_optimizer" not in extra:
            raise CheckpointStateError(f"{self.checkpointer.loaded_from} has no second-pass optimizer state, but "
                                       f"method {self.cfg.method!r} needs one: it was written by a run of another "
                                       f"method; start fresh with --no-resume or another --output-dir")
        self.second_pass.optimizer.load_state_dict(extra["second_pass_optimizer"])

    def _log_setup(self) -> None:
        model = unwrap_model(self.model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("method %s: %s %dx%d stride %d, head %s, feature dim %d, SIE %s, JPM %s, %.2fM trainable "
                    "parameters; %d process(es) on %s, %s", self.cfg.method, self.cfg.model.arch,
                    *self.cfg.model.img_size, self.cfg.model.stride_size, self.cfg.model.head,
                    getattr(model, "feature_dim", -1), self.cfg.model.sie_camera, self.cfg.model.jpm,
                    trainable / 1e6, self.world_size, self.device, self.precision.describe())
        if self.world_size > 1:
            logger.info("train.ddp_batch=%s: %s", self.cfg.train.ddp_batch,
                        f"losses and BatchNorm statistics over the global batch of {self.cfg.data.batch_size} "
                        f"images (outputs gathered from the {self.world_size} processes, BatchNorm synchronised)"
                        if self.global_batch else
                        f"losses and BatchNorm statistics within each process's {self.sampler.per_rank_batch_size} "
                        f"images, gradients averaged")

    def _epoch_lengths(self) -> list[int]:
        """Optimizer steps of each epoch (the P x K epoch length varies slightly between epochs)."""
        lengths = [len(self.sampler.global_batches(epoch)) for epoch in range(self.cfg.train.epochs)]
        if sum(lengths) == 0:
            raise ConfigError("the training set yields no P x K batch: fewer identities than batch_size / "
                              "num_instances; lower data.batch_size")
        return lengths

    def _epoch_lrs(self, epoch: int) -> list[float]:
        return epoch_learning_rates(self.cfg.optim, epoch, self.cfg.train.epochs, self.base_lrs)

    def _build_schedules(self) -> dict[str, Any]:
        return self.epoch_schedules()

    def _step(self, batch: dict[str, Any]) -> dict[str, float]:
        images = batch["img"].to(self.device, non_blocking=True)
        pids = torch.as_tensor(batch["pid"]).to(self.device, non_blocking=True)
        camids = torch.as_tensor(batch["camid"]).to(self.device, non_blocking=True)
        extras = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()
                  if key not in _STANDARD_BATCH_KEYS}
        terms = self._loss_terms(self.model, images, pids, camids, extras)
        loss = terms["loss"]
        check_finite(loss, self.iteration + 1, extra={k: v for k, v in terms.items() if k != "loss"})
        self._backward_and_step(loss)
        values = {key: float(value.detach()) for key, value in terms.items()}
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.second_pass is not None:
            values["second_pass_loss"] = self._second_pass_step(images, pids, camids, extras)
        return values

    def _loss_terms(self, model: torch.nn.Module, images: torch.Tensor, pids: torch.Tensor, camids: torch.Tensor,
                    extras: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Forward and criterion; with :attr:`global_batch` the criterion gets every rank's outputs and labels.

        Every rank then computes the same loss, the 1-process loss of the global batch; the gathers' backward
        and DDP's averaging make the step use its gradient (see :mod:`passreid.dist.batch`).
        """
        with self.amp.autocast():
            output = model(images, camids=camids, **extras)
            if self.global_batch:
                output, pids = dist.gather_batch((output, pids), images.shape[0])
            return self.criterion(output, pids)

    def _second_pass_step(self, images: torch.Tensor, pids: torch.Tensor, camids: torch.Tensor,
                          extras: dict[str, Any]) -> float:
        """Recompute forward and loss with the updated weights and step only the second-pass parameters.

        Gradients come from ``torch.autograd.grad`` w.r.t. those parameters only (nothing else is
        back-propagated or touched), through the unwrapped model; under DDP they are averaged by hand.
        """
        optimizer = self.second_pass.optimizer
        terms = self._loss_terms(unwrap_model(self.model), images, pids, camids, extras)
        loss = terms["loss"]
        check_finite(loss, self.iteration + 1,
                     extra={f"second_pass_{k}": v for k, v in terms.items() if k != "loss"})
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
    def _evaluate(self) -> EvalResult | None:
        model = unwrap_model(self.model)
        result = evaluate_model(model, self.data.test, tuple(self.cfg.model.img_size), self.cfg, self.device,
                                autocast=self.eval_amp.autocast, rank=self.rank, world_size=self.world_size,
                                test_distance=get_method(self.cfg.method).build_test_distance)
        self.last_eval_iteration = self.iteration
        if result is not None:
            self.last_metrics = result.metrics
            self.metrics.write(self.iteration, split="eval", epoch=self.epoch, **result.metrics)
            logger.info("evaluation on %s after epoch %d (iteration %d):\n%s", self.data.test.name, self.epoch,
                        self.iteration, format_result(result))
        return result

    def _result(self, final_path: Path | None, preempted: bool) -> TrainResult:
        return TrainResult(self.output_dir, self.iteration, self.epoch, self.last_metrics, final_path, preempted)

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
    # The guard goes in before the set-up: a pre-emption signal while data and model load is not lost.
    with torch_threads(cfg.train.num_threads), preemption_guard():
        return FinetuneTrainer(cfg, resume=resume).run()
