"""The PASS / DINO pre-training loop (dinov2-style: schedules indexed by iteration, one meta-architecture).

One iteration, in the published order (PASS-reID: PASS/main_pass.py, ``train_one_epoch``):

1. write this iteration's lr and weight decay into the AdamW groups (wd only where ``wd_multiplier`` is 1);
2. ``PASSMetaArch.forward_backward`` under autocast: teacher on the 2 globals, student on all views,
   the loss (which also updates and all-reduces the centres), backward (scaled under fp16);
3. NaN guard before any weight changes: the meta-architecture checks the loss of every rank before
   backward (all-reduced, so every rank stops together and none is left waiting in backward);
4. unscale, per-tensor clip at ``optim.clip_grad``, drop the last layers' grads in epochs
   ``< optim.freeze_last_layer``, optimizer step, scaler update;
5. EMA update of the teacher with this iteration's momentum.

Data (:mod:`passreid.pretrain.data`): unlabeled items -> :class:`MultiCropDataset` (``MultiCropAugmentation`` on each image)
-> ``ResumableDistributedSampler`` (shuffled, sharded, drop_last) -> DataLoader -> a list of
``2 + local_crops_number`` batched tensors. With ``data.augment_on=gpu`` the workers hand over the
decoded images and the drawn parameters instead, and the views are made batched on the training device
(``passreid.data.device_multicrop``; same parameters for the same sample seed). Every sample's
augmentation is seeded from ``(seed, epoch, index)``, so the views do not depend on the number of DataLoader workers nor on
where a run was interrupted: a resumed run continues exactly (same losses), with workers too.

Outputs in ``train.output_dir``: ``config.yaml``, ``log.txt``, ``metrics.jsonl`` + ``tb/``,
``checkpoint.pth`` (full state; also written every ``train.checkpoint_period_iters`` iterations),
``backbone.pth`` (teacher backbone export after every epoch), ``backbone_final.pth`` (the same,
written once training has finished: the hand-over to fine-tuning / USL / UDA).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from passreid import dist
from passreid.config import ConfigError
from passreid.data.device_multicrop import BatchedMultiCrop, MultiCropParamSampler
from passreid.engine import (CheckpointStateError, apply_schedule, atomic_save, check_finite, cosine_schedule,
                             preemption_guard, seed_everything)
from passreid.engine.trainer import StopReason, Trainer
from passreid.models import export_backbone
from passreid.pretrain.config import PretrainConfig, validate_pretrain_config
from passreid.pretrain.knn_monitor import KnnMonitor
from passreid.pretrain.data import BatchSource, EpochLoader, MultiCropDataset, build_multicrop, resolve_data_items
from passreid.pretrain.meta_arch import PASSMetaArch, to_published_layout

logger = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.pth"
BACKBONE_FINAL_FILE = "backbone_final.pth"


# ============================================================================ schedules


@dataclass
class Schedules:
    """Per-iteration values, each an array of length ``epochs * iters_per_epoch``."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    peak_lr: float

    def __len__(self) -> int:
        return len(self.lr)


def peak_learning_rate(cfg: PretrainConfig, world_size: int) -> float:
    """``optim.lr x global batch / 256`` (linear scaling rule; PASS ViT-S 128 x 8 -> 2e-3)."""
    return cfg.optim.lr * cfg.data.batch_size_per_gpu * world_size / 256.0


def build_schedules(cfg: PretrainConfig, iters_per_epoch: int, world_size: int) -> Schedules:
    """lr: linear warm-up from 0 over ``optim.warmup_epochs``, then cosine to ``optim.min_lr``;
    weight decay: cosine ``weight_decay -> weight_decay_end``; teacher momentum: cosine
    ``momentum_teacher -> momentum_teacher_end`` (PASS/utils.py ``cosine_scheduler``, as PASS/main_pass.py uses it)."""
    if iters_per_epoch < 1:
        raise ValueError(f"build_schedules: iters_per_epoch must be >= 1, got {iters_per_epoch}")
    total = cfg.train.epochs * iters_per_epoch
    peak = peak_learning_rate(cfg, world_size)
    optim = cfg.optim
    return Schedules(
        lr=cosine_schedule(peak, optim.min_lr, total, warmup_iters=optim.warmup_epochs * iters_per_epoch),
        weight_decay=cosine_schedule(optim.weight_decay, optim.weight_decay_end, total),
        momentum=cosine_schedule(optim.momentum_teacher, optim.momentum_teacher_end, total),
        peak_lr=peak,
    )


# ============================================================================ the stage


@dataclass
class PretrainResult:
    """What :func:`run_pretraining` hands back (rank-0 values; other ranks get the same numbers)."""

    output_dir: Path
    iteration: int  # optimizer steps completed
    finished: bool  # all epochs done (False when stopped by train.max_iters or pre-emption)
    knn: list[dict[str, float]]  # every kNN evaluation of the run, in order (kept across resumes)
    backbone: Path | None  # latest backbone export (None before the first epoch end)
    preempted: bool = False  # stopped by SIGUSR1/SIGTERM with checkpoint.pth written: requeue and resume


class PretrainTrainer(Trainer):
    """PASS / DINO pre-training on :class:`~passreid.engine.trainer.Trainer`: the meta-architecture's step,
    per-iteration lr / weight decay / teacher momentum, the kNN monitor and the backbone export as hooks."""

    log = logger
    stage_name = "pre-training"

    def __init__(self, cfg: PretrainConfig, *, resume: bool = True, batch_source: BatchSource | None = None) -> None:
        validate_pretrain_config(cfg)
        self.batch_source = batch_source
        self.corrupt_skipped = 0
        self.knn_history: list[dict[str, float]] = []  # every kNN evaluation of the run (kept across resumes)
        super().__init__(cfg, resume)

    # ------------------------------------------------------------------ set-up
    def _eval_precision_key(self) -> str:
        # PASS main_pass.py (--use_fp16, default True): fp16 autocast + GradScaler; the kNN monitor (not part of
        # the published code) extracts its features under the same autocast.
        return "train.precision"

    def _keep_checkpoint_every(self) -> int | None:
        return self.cfg.train.keep_checkpoint_period or None

    def _keep_checkpoint_copy(self) -> bool:
        every = self.cfg.train.keep_checkpoint_period
        return bool(every) and self.epoch % every == 0

    def _build(self, resuming: bool) -> None:
        cfg = self.cfg
        # Same initial weights on every rank: the teacher is a copy of the student and is not broadcast by DDP.
        # Then a per-rank stream for drop-path and anything else random.
        seed_everything(cfg.train.seed)
        self.meta = self._build_meta_arch().to(self.device)
        self.model = self.meta  # what the checkpoint stores (DDP wraps the student inside, not the module tree)
        if cfg.train.compile != "none":  # in place: compiled on the first step, parameter names unchanged
            self.meta.compile_backbones(cfg.train.compile)
            logger.info("student and teacher backbones: torch.compile mode %s", cfg.train.compile)
        if cfg.train.batch_band_views:
            logger.info("student: the band views of all bands in one backbone pass (train.batch_band_views)")
        seed_everything(cfg.train.seed + self.rank)
        if self.batch_source is not None:
            self.source: BatchSource = self.batch_source
            self.num_images = None
        else:
            augmentation = build_multicrop(cfg)
            on_device = BatchedMultiCrop(augmentation) if cfg.data.augment_on == "gpu" else None
            dataset = MultiCropDataset(resolve_data_items(cfg),
                                       augmentation if on_device is None else MultiCropParamSampler(augmentation),
                                       seed=cfg.train.seed, skip_corrupt=cfg.data.skip_corrupt)
            self.source = EpochLoader(cfg, dataset, self.rank, self.world_size, self.device, on_device)
            self.num_images = len(dataset)
        self.iters_per_epoch = self.source.iters_per_epoch
        self.global_batch = cfg.data.batch_size_per_gpu * self.world_size
        self.optimizer = torch.optim.AdamW(self.meta.param_groups(), lr=0.0, **self._adamw_kernel())
        self.monitor = self._build_monitor()

    def _build_schedules(self) -> dict[str, np.ndarray]:
        schedules = build_schedules(self.cfg, self.iters_per_epoch, self.world_size)
        self.peak_lr = schedules.peak_lr
        return {"lr": schedules.lr, "weight_decay": schedules.weight_decay, "momentum": schedules.momentum}

    def total_iterations(self) -> int:
        return len(self.schedules["lr"])  # train.max_iters pauses a pre-training run; the schedules span every epoch

    def _build_meta_arch(self) -> PASSMetaArch:
        cfg = self.cfg
        loss = cfg.loss
        return PASSMetaArch(
            cfg.model.arch, tuple(cfg.model.img_size), out_dim=cfg.model.out_dim, hidden_dim=cfg.model.hidden_dim,
            bottleneck_dim=cfg.model.bottleneck_dim, norm_last_layer=cfg.model.norm_last_layer,
            drop_path_rate=cfg.model.drop_path_rate, mode=cfg.crops.mode,
            loss_kwargs=dict(student_temp=loss.student_temp, teacher_temp=loss.teacher_temp,
                             warmup_teacher_temp=loss.warmup_teacher_temp,
                             warmup_teacher_temp_epochs=loss.warmup_teacher_temp_epochs,
                             center_momentum=loss.center_momentum, total_epochs=cfg.train.epochs),
            local_crops_number=cfg.crops.local_crops_number, batch_band_views=cfg.train.batch_band_views,
        )

    def _adamw_kernel(self) -> dict[str, bool]:
        # fused kernels on CUDA (one launch for all tensors); the default foreach path elsewhere.
        return {"fused": True} if self.device.type == "cuda" else {"foreach": True}

    def _wrap_distributed(self) -> None:
        # The student alone is trained by gradients; the teacher (EMA, no BN) stays unwrapped.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.meta.wrap_student(lambda network: DistributedDataParallel(network, device_ids=device_ids))

    def _build_monitor(self) -> KnnMonitor | None:
        cfg = self.cfg
        if cfg.monitor.period == 0:
            return None
        root = cfg.monitor.root
        if not root:
            self.log.info("kNN monitor off: monitor.root is empty (set it to a labeled folder, e.g. Market-1501, "
                          "to watch the teacher's kNN mAP)")
            return None
        if Path(root).resolve() == Path(cfg.data.root).resolve():
            raise ConfigError(f"config key 'monitor.root': {root} is the training data (data.root): the kNN monitor "
                              f"would rank the training images; point it to a held-out labeled folder")
        monitor = KnnMonitor(cfg.monitor, root, self.device, num_workers=min(cfg.data.num_workers, 4))
        self.log.info("kNN monitor: %s, %d query / %d gallery images, every %d epoch(s)", monitor.dataset_label,
                      monitor.num_query, monitor.num_gallery, cfg.monitor.period)
        return monitor

    def _log_setup(self) -> None:
        cfg = self.cfg
        self.already_complete = self.iteration >= self.total_iterations()
        stale_final = self.output_dir / BACKBONE_FINAL_FILE
        if self.rank == 0 and not self.already_complete and stale_final.is_file():
            # Its presence means "pre-training completed"; one from an earlier run must not say so now.
            self.log.warning("removing %s left by an earlier run", stale_final)
            stale_final.unlink()
        images = f"{self.num_images} images, " if self.num_images is not None else ""
        self.log.info(
            "pre-training (%s mode, %s) on %d process(es), device %s, output %s; %s%d iterations/epoch x %d epochs "
            "= %d iterations; global batch %d (%d x %d); peak lr %.3g (%.3g x %d / 256)", cfg.crops.mode,
            cfg.model.arch, self.world_size, self.device, self.output_dir, images, self.iters_per_epoch,
            cfg.train.epochs, self.total_iterations(), self.global_batch, cfg.data.batch_size_per_gpu,
            self.world_size, self.peak_lr, cfg.optim.lr, self.global_batch)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_extra(self, stopped_in_epoch: int | None) -> dict[str, Any]:
        return {"iters_per_epoch": self.iters_per_epoch, "world_size": self.world_size,
                "global_batch": self.global_batch, "corrupt_skipped": self._total_corrupt_skipped(),
                "knn": list(self.knn_history)}

    def _total_corrupt_skipped(self) -> int:
        """Damaged images skipped so far by all ranks (a collective: the ranks' counts summed)."""
        return round(float(dist.all_reduce_mean(torch.tensor([float(self.corrupt_skipped)]))[0]) * self.world_size)

    def _decorate_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        # The published layout as aliases of the same tensors (torch.save stores them once), so that
        # load_pretrained(vit, "checkpoint.pth") and PASS conversion tools find the teacher directly.
        state.update(to_published_layout(state["model"]))
        return state

    def _check_resumable(self, state: dict[str, Any]) -> None:
        extra = state.get("extra") or {}
        saved = (extra.get("iters_per_epoch"), extra.get("world_size"))
        at_epoch_start = int((state.get("sampler") or {}).get("position", 0)) == 0
        if saved != (self.iters_per_epoch, self.world_size) and not at_epoch_start:
            raise CheckpointStateError(
                f"{self.checkpointer.loaded_from} was written mid-epoch with {saved[0]} iterations/epoch on "
                f"{saved[1]} process(es); this run has {self.iters_per_epoch} on {self.world_size}. Resume "
                f"with the same data, batch size and process count, or start fresh with --no-resume")

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        saved_ipe, saved_world = extra.get("iters_per_epoch"), extra.get("world_size")
        if (saved_ipe, saved_world) != (self.iters_per_epoch, self.world_size):
            self.log.warning("resuming at the start of epoch %d with %d iterations/epoch on %d process(es) "
                             "(checkpoint: %s on %s); schedules follow the new length", self.epoch + 1,
                             self.iters_per_epoch, self.world_size, saved_ipe, saved_world)
            self.iteration = self.epoch * self.iters_per_epoch
        # The saved count is the total over ranks: rank 0 carries it on, so that the sum stays the total.
        self.corrupt_skipped = int(extra.get("corrupt_skipped", 0)) if self.rank == 0 else 0
        self.knn_history = list(extra.get("knn", []))

    # ------------------------------------------------------------------ batches
    def _epoch_batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        return self.source.batches(epoch, self._done_in_epoch(epoch))

    def _done_in_epoch(self, epoch: int) -> int:
        return self.iteration - epoch * self.iters_per_epoch

    def _epoch_position(self, epoch: int, batches: int) -> dict[str, int]:
        return {"epoch": epoch, "position": self._done_in_epoch(epoch) * self.cfg.data.batch_size_per_gpu}

    def _epoch_size(self, epoch: int) -> int:
        return self.iters_per_epoch * self.cfg.data.batch_size_per_gpu

    # ------------------------------------------------------------------ one iteration
    def _apply_schedules(self, iteration: int) -> None:
        apply_schedule(self.optimizer, lr=self.schedules["lr"][iteration],
                       weight_decay=self.schedules["weight_decay"][iteration])

    def _step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimizer step at ``self.iteration`` (see the module docstring for the order)."""
        it, epoch = self.iteration, self.epoch
        self.optimizer.zero_grad(set_to_none=True)
        views = [v.to(self.device, non_blocking=True) for v in batch["views"]]
        loss, self.step_stats = self.meta.forward_backward(views, epoch, autocast=self.amp.autocast,
                                                           scaler=self.amp.scaler, iteration=it + 1)
        # The mean over ranks, the loss that is logged (forward_backward has checked every rank's).
        mean_loss = check_finite(dist.all_reduce_mean(loss.detach().float().reshape(1)), it + 1,
                                 extra=self.step_stats)
        scaler = self.amp.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.cfg.optim.clip_grad > 0:
            self.meta.clip_gradients(self.cfg.optim.clip_grad)
        if epoch < self.cfg.optim.freeze_last_layer:
            self.meta.cancel_last_layer_grads()
        self._optimizer_step()
        self.meta.update_teacher(float(self.schedules["momentum"][it]))
        return {"loss": mean_loss, "lr": float(self.schedules["lr"][it])}

    def _before_epochs(self) -> None:
        if self.iteration == 0:
            self.run_monitor()
        self.window_start, self.window_images = time.perf_counter(), 0

    def _prepare_epoch(self, epoch: int) -> None:
        self.window_start, self.window_images = time.perf_counter(), 0  # throughput counts training only

    def _after_step(self, batch: dict[str, Any], terms: dict[str, float], epoch: int) -> None:
        self.corrupt_skipped += int(batch["skipped"])
        self.window_images += self.global_batch
        if self.iteration % self.cfg.train.log_period == 0 or self.iteration == self.total_iterations():
            elapsed = time.perf_counter() - self.window_start
            self._log_iteration(terms["loss"], self.step_stats, self.window_images / max(elapsed, 1e-9))
            self.window_start, self.window_images = time.perf_counter(), 0

    def _log_iteration(self, loss: float, stats: dict[str, Any], images_per_second: float) -> None:
        """The "train" record of the step just taken: step = ``self.iteration`` (steps done, so 1 for the first),
        epoch 1-based, lr / wd / momentum the values that step used."""
        it = self.iteration - 1  # index of the step just taken into the per-iteration schedules
        skipped = float(self._total_corrupt_skipped())
        scalars = {"loss": loss, "lr": float(self.schedules["lr"][it]),
                   "wd": float(self.schedules["weight_decay"][it]), "momentum": float(self.schedules["momentum"][it]),
                   "epoch": float(self.epoch + 1), "images_per_s": images_per_second, "corrupt_skipped": skipped}
        for key, value in stats.items():  # per-token losses, teacher entropies, temperature
            if isinstance(value, torch.Tensor) and value.numel() == 1 or isinstance(value, (int, float)):
                scalars.setdefault(key, float(value))
        for name, center in zip(self.meta.loss.token_names, self.meta.loss.centers()):
            scalars[f"center_norm_{name}"] = float(center.norm())
        remaining = self.total_iterations() - self.iteration
        scalars["eta_s"] = remaining * self.global_batch / images_per_second if images_per_second > 0 else math.nan
        self.metrics.write(self.iteration, **scalars)

    # ------------------------------------------------------------------ epoch ends and outputs
    def _finish_epoch(self, epoch: int) -> None:
        """The teacher backbone export of every epoch and the kNN monitor at its period (and after the last)."""
        self.export_backbone()
        last = self.epoch == self.cfg.train.epochs
        if self.monitor is not None and (self.epoch % self.cfg.monitor.period == 0 or last):
            self.run_monitor()
        self.metrics.flush()
        self.log.info("epoch %d/%d done (iteration %d)", epoch + 1, self.cfg.train.epochs, self.iteration)

    def _evaluation_due(self, last: bool) -> bool:
        return False  # the kNN monitor runs in _finish_epoch, before the epoch's checkpoint keeps its history

    def export_backbone(self, name: str = BACKBONE_FILE) -> Path | None:
        """Write the teacher backbone (part tokens kept) in the passreid export format (rank 0)."""
        if self.rank != 0:
            return None
        export = export_backbone(self.meta.teacher_backbone(), self.cfg.model.arch, source="passreid pretrain",
                                 mode=self.cfg.crops.mode, epoch=self.epoch, iteration=self.iteration)
        return atomic_save(export, self.output_dir / name)

    def run_monitor(self) -> dict[str, float] | None:
        """kNN mAP / Rank-1 of the teacher backbone, logged under split ``knn``."""
        if self.monitor is None:
            return None
        start = time.perf_counter()
        scores = self.monitor.evaluate(self.meta.teacher_backbone(), autocast=self.eval_amp.autocast)
        scores = {**scores, "epoch": float(self.epoch), "iteration": float(self.iteration)}
        self.knn_history.append(scores)
        self.metrics.write(self.iteration, split="knn", **scores)
        self.log.info("kNN monitor at epoch %d (iteration %d): mAP %.2f%%  Rank-1 %.2f%%  (%.1f s)", self.epoch,
                      self.iteration, 100 * scores["mAP"], 100 * scores["rank1"], time.perf_counter() - start)
        return scores

    def _complete(self, stop: StopReason) -> PretrainResult:
        """Every epoch done: ``backbone_final.pth``, the hand-over to the next stage. At ``train.max_iters`` the
        run pauses with ``checkpoint.pth`` only (a longer run resumes from it)."""
        if stop == "max_iters":
            self.log.info("stopping after iteration %d (train.max_iters); checkpoint written", self.iteration)
            self.metrics.close()
            return self._result(None, preempted=False, finished=False)
        final = self.output_dir / BACKBONE_FINAL_FILE
        if self.already_complete:
            self.log.info("training already complete (%d iterations); nothing to do", self.iteration)
        if self.rank == 0 and not (self.already_complete and final.is_file()):
            self.export_backbone(BACKBONE_FINAL_FILE)
            self.log.info("training finished: teacher backbone in %s", final)
        dist.barrier()
        self.metrics.close()
        return self._result(final, preempted=False, finished=True)

    def _result(self, final_path: Path | None, preempted: bool, finished: bool = False) -> PretrainResult:
        backbone = self.output_dir / BACKBONE_FILE
        return PretrainResult(output_dir=self.output_dir, iteration=self.iteration, finished=finished,
                              knn=list(self.knn_history), backbone=backbone if backbone.is_file() else None,
                              preempted=preempted)


def run_pretraining(cfg: PretrainConfig, *, resume: bool = True,
                    batch_source: BatchSource | None = None) -> PretrainResult:
    """Run (or resume) the pre-training described by ``cfg``; see the module docstring.

    ``batch_source`` replaces the ``data.*`` pipeline by one's own (:class:`BatchSource`).
    """
    with preemption_guard():  # before the set-up: a pre-emption signal while data and model load is not lost
        return PretrainTrainer(cfg, resume=resume, batch_source=batch_source).run()


__all__ = [
    "BACKBONE_FILE",
    "BACKBONE_FINAL_FILE",
    "PretrainResult",
    "PretrainTrainer",
    "Schedules",
    "build_schedules",
    "peak_learning_rate",
    "run_pretraining",
]
