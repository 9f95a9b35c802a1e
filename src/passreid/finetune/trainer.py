"""The supervised fine-tuning loop: P x K batches, per-epoch warm-up cosine, exact resume.

Each iteration moves the batch to the device, runs :meth:`ReIDMetaArch.forward_backward` (the method's
model and criterion, :mod:`passreid.finetune.meta_arch`), steps the optimizer and, for a method with one,
the meta-architecture's second pass (e.g. DPM's mask generator).

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

from passreid import dist
from passreid.config import ConfigError
from passreid.data.samplers import RandomIdentitySampler
from passreid.engine import CheckpointStateError, atomic_save, output_layout, preemption_guard, unwrap_model
from passreid.engine.optim import make_optimizer
from passreid.engine.trainer import Trainer, torch_threads
from passreid.eval.evaluator import EvalResult, evaluate_model, format_result
from passreid.finetune.checkpoints import build_final_checkpoint
from passreid.finetune.config import FinetuneConfig, validate_config
from passreid.finetune.data import FinetuneData, build_train_set, load_finetune_data
from passreid.finetune.meta_arch import ReIDBatch, ReIDMetaArch
from passreid.finetune.methods import get_method
from passreid.finetune.optim import epoch_learning_rates

__all__ = ["FinetuneTrainer", "TrainResult", "run_training"]

logger = logging.getLogger("passreid.finetune")


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
        self.meta = ReIDMetaArch.from_config(cfg, self.data.num_classes, self.data.num_cameras,
                                             load_weights=not resuming, device=self.device)
        self.model = self.meta.model  # what the checkpoint stores (the DDP wrapper once distributed)
        self._log_second_pass()
        self.optimizer = make_optimizer(self.meta.param_groups(cfg.optim), cfg.optim)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]  # what the schedule scales
        self.train_set = build_train_set(self.data.train.train, cfg)
        self.sampler = RandomIdentitySampler([item.pid for item in self.data.train.train], cfg.data.batch_size,
                                             cfg.data.num_instances, seed=cfg.train.seed, rank=self.rank,
                                             world_size=self.world_size)

    def _log_second_pass(self) -> None:
        second = self.meta.second_pass
        if second is not None:
            params = self.meta.second_pass_params
            logger.info("second pass: %d parameter tensors (%.2fM) stepped by their own %s after each main step",
                        len(params), sum(p.numel() for p in params) / 1e6, type(second.optimizer).__name__)

    def _wrap_distributed(self) -> None:
        self.model = self.meta.distribute(self._ddp, global_batch=self.global_batch, device=self.device)

    @property
    def global_batch(self) -> bool:
        """True when N > 1 processes compute the loss and BatchNorm statistics of the whole global batch."""
        return self.world_size > 1 and self.cfg.train.ddp_batch == "global"

    def _checkpoint_extra(self, stopped_in_epoch: int | None) -> dict[str, Any]:
        # The counts let test.py / extract_features.py rebuild any method's model from checkpoint.pth alone.
        extra: dict[str, Any] = {"num_classes": self.data.num_classes, "num_cameras": self.data.num_cameras}
        if self.meta.second_pass is not None:
            extra["second_pass_optimizer"] = self.meta.second_pass.optimizer.state_dict()
        return extra

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        if self.meta.second_pass is None:
            return
        if "second_pass_optimizer" not in extra:
            raise CheckpointStateError(f"{self.checkpointer.loaded_from} has no second-pass optimizer state, but "
                                       f"method {self.cfg.method!r} needs one: it was written by a run of another "
                                       f"method; start fresh with --no-resume or another --output-dir")
        self.meta.second_pass.optimizer.load_state_dict(extra["second_pass_optimizer"])

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
        batch = ReIDBatch.from_loader(batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.meta.forward_backward(batch, autocast=self.amp.autocast, scaler=self.amp.scaler,
                                           iteration=self.iteration + 1)  # raises on a NaN/Inf loss
        self._optimizer_step()
        values = {key: float(value) for key, value in terms.items()}
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.meta.second_pass is not None:
            values["second_pass_loss"] = self.meta.second_pass_step(
                batch, autocast=self.amp.autocast, scaler=self.amp.scaler, iteration=self.iteration + 1)
        return values

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
