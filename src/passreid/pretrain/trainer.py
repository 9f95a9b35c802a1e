"""The PASS / DINO pre-training loop (dinov2-style: schedules indexed by iteration, one meta-architecture).

One iteration, in the published order (PASS-reID: PASS/main_pass.py, ``train_one_epoch``):

1. write this iteration's lr and weight decay into the AdamW groups (wd only where ``wd_multiplier`` is 1);
2. ``PASSMetaArch.forward_backward`` under autocast: teacher on the 2 globals, student on all views,
   the loss (which also updates and all-reduces the centres), backward (scaled under fp16);
3. NaN guard before any weight changes: the meta-architecture checks its loss before backward, the
   loop checks the mean over ranks (so every rank stops together, none is left waiting);
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from passreid import dist
from passreid.config import ConfigError, config_to_dict, save_config
from passreid.data.device_multicrop import BatchedMultiCrop, MultiCropParamSampler
from passreid.engine import (CheckpointStateError, Checkpointer, MetricsWriter, PreemptionGuard, ProgressLogger,
                             apply_schedule, atomic_save, autocast_for, batches_until_preempted, build_checkpoint,
                             check_finite, cosine_schedule, describe_precision, gather_rng_states, make_output_dir,
                             output_layout, preemption_guard, resolve_precision, restore_checkpoint, save_schedules,
                             seed_everything, select_device, setup_logging)
from passreid.engine.logger import run_position
from passreid.models import export_backbone
from passreid.pretrain.config import PretrainConfig, validate_pretrain_config
from passreid.pretrain.knn_monitor import KnnMonitor
from passreid.pretrain.data import (BatchSource, EpochLoader, MultiCropDataset, Views, build_multicrop,
                                    resolve_data_items)
from passreid.pretrain.meta_arch import PASSMetaArch, to_published_layout

logger = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.pth"
BACKBONE_FINAL_FILE = "backbone_final.pth"
# Keys that say how this invocation runs rather than what is trained: changing them on resume is expected.
_RUN_CONTROL_KEYS = ("train.max_iters", "train.output_dir")


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


class PretrainStage:
    """State and steps of one pre-training run; :func:`run_pretraining` drives it."""

    def __init__(self, cfg: PretrainConfig, *, resume: bool = True, batch_source: BatchSource | None = None) -> None:
        validate_pretrain_config(cfg)
        self.cfg = cfg
        self.env = dist.init_distributed()
        self.rank, self.world_size = self.env.rank, self.env.world_size
        self.device = select_device(cfg.train.device, dist.get_local_rank())
        # PASS main_pass.py (--use_fp16, default True): fp16 autocast + GradScaler; the kNN monitor (not part of
        # the published code) extracts its features under the same autocast.
        self.precision = describe_precision(
            cfg.train.precision, resolve_precision(self.device, cfg.train.precision, "train.precision"))
        self.out = make_output_dir(cfg.train.output_dir)
        self.log = setup_logging(self.out, rank=self.rank)
        self.is_main = self.rank == 0
        self.log.info("pre-training (%s mode, %s) on %d process(es), device %s, precision %s, output %s",
                      cfg.crops.mode, cfg.model.arch, self.world_size, self.device, self.precision, self.out)

        # Same initial weights on every rank: the teacher is a copy of the student and is not
        # broadcast by DDP. Then a per-rank stream for drop-path and anything else random.
        seed_everything(cfg.train.seed)
        self.meta = self._build_meta_arch().to(self.device)
        seed_everything(cfg.train.seed + self.rank)

        if batch_source is not None:
            self.source: BatchSource = batch_source
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
        self.schedules = build_schedules(cfg, self.iters_per_epoch, self.world_size)
        self.total_iters = len(self.schedules)
        if self.is_main:
            save_schedules(output_layout(self.out).schedules, lr=self.schedules.lr,
                           weight_decay=self.schedules.weight_decay, momentum=self.schedules.momentum)

        self.optimizer = torch.optim.AdamW(self.meta.param_groups(), lr=0.0, **self._adamw_kernel())
        self.amp = autocast_for(self.device, cfg.train.precision)
        if self.world_size > 1:
            # The student alone is trained by gradients; the teacher (EMA, no BN) stays unwrapped.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.meta.wrap_student(lambda network: DistributedDataParallel(network, device_ids=device_ids))
        self.checkpointer = Checkpointer(self.out, is_main=self.is_main,
                                         keep_every=cfg.train.keep_checkpoint_period or None)
        self.epoch, self.iteration, self.corrupt_skipped = 0, 0, 0
        self.knn_history: list[dict[str, float]] = []  # every kNN evaluation of the run (kept across resumes)
        if resume:
            self._resume()
        elif self.checkpointer.has_checkpoint():
            self.log.warning("--no-resume: ignoring %s; it will be overwritten", self.checkpointer.path())
        self._already_complete = self.iteration >= self.total_iters
        stale_final = self.out / BACKBONE_FINAL_FILE
        if self.is_main and not self._already_complete and stale_final.is_file():
            # Its presence means "pre-training completed"; one from an earlier run must not say so now.
            self.log.warning("removing %s left by an earlier run", stale_final)
            stale_final.unlink()
        if self.is_main:
            save_config(cfg, self.out / "config.yaml", comment=f"precision that ran on {self.device}: {self.precision}")
        self.metrics = MetricsWriter(self.out, enabled=self.is_main,
                                     purge_step=self.iteration + 1 if self.iteration else None)
        self.monitor = self._build_monitor()
        self._log_summary()

    # ------------------------------------------------------------------ set-up
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
            local_crops_number=cfg.crops.local_crops_number,
        )

    def _adamw_kernel(self) -> dict[str, bool]:
        # fused kernels on CUDA (one launch for all tensors); the default foreach path elsewhere.
        return {"fused": True} if self.device.type == "cuda" else {"foreach": True}

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

    def _log_summary(self) -> None:
        cfg = self.cfg
        images = f"{self.num_images} images, " if self.num_images is not None else ""
        self.log.info(
            "%s%d iterations/epoch x %d epochs = %d iterations; global batch %d (%d x %d); peak lr %.3g "
            "(%.3g x %d / 256); precision %s", images, self.iters_per_epoch, cfg.train.epochs, self.total_iters,
            self.global_batch, cfg.data.batch_size_per_gpu, self.world_size, self.schedules.peak_lr, cfg.optim.lr,
            self.global_batch, self.precision)

    # ------------------------------------------------------------------ checkpoints
    def _sampler_state(self) -> dict[str, int]:
        done_in_epoch = self.iteration - self.epoch * self.iters_per_epoch
        return {"epoch": self.epoch, "position": done_in_epoch * self.cfg.data.batch_size_per_gpu}

    def save_checkpoint(self, keep_copy: bool = False) -> None:
        """Write ``checkpoint.pth`` (collective: every rank must call it, rank 0 writes)."""
        state = build_checkpoint(
            optimizer=self.optimizer, scaler=self.amp.scaler, epoch=self.epoch, iteration=self.iteration,
            sampler=self._sampler_state(), config=config_to_dict(self.cfg), rng_states=gather_rng_states(),
            extra={"iters_per_epoch": self.iters_per_epoch, "world_size": self.world_size,
                   "global_batch": self.global_batch, "corrupt_skipped": self.corrupt_skipped,
                   "knn": list(self.knn_history)},
        )
        state["model"] = self.meta.state_dict()  # DDP stays outside the module tree: same keys for any world size
        # The published layout as aliases of the same tensors (torch.save stores them once), so that
        # load_pretrained(vit, "checkpoint.pth") and PASS conversion tools find the teacher directly.
        state.update(to_published_layout(state["model"]))
        path = self.checkpointer.save(state, step=(self.epoch if keep_copy else None))
        if path is not None:
            self.log.info("saved %s (epoch %d, iteration %d)", path, self.epoch, self.iteration)

    def _resume(self) -> None:
        state = self.checkpointer.load()
        if state is None:
            return
        extra = state.get("extra") or {}
        saved_ipe, saved_world = extra.get("iters_per_epoch"), extra.get("world_size")
        sampler = state.get("sampler") or {}
        at_epoch_start = int(sampler.get("position", 0)) == 0
        if (saved_ipe, saved_world) != (self.iters_per_epoch, self.world_size) and not at_epoch_start:
            raise CheckpointStateError(
                f"{self.checkpointer.loaded_from} was written mid-epoch with {saved_ipe} iterations/epoch on "
                f"{saved_world} process(es); this run has {self.iters_per_epoch} on {self.world_size}. Resume "
                f"with the same data, batch size and process count, or start fresh with --no-resume")
        info = restore_checkpoint(state, model=self.meta, optimizer=self.optimizer, scaler=self.amp.scaler,
                                  rank=self.rank, world_size=self.world_size)
        self.epoch, self.iteration = info.epoch, info.iteration
        if (saved_ipe, saved_world) != (self.iters_per_epoch, self.world_size):
            self.log.warning("resuming at the start of epoch %d with %d iterations/epoch on %d process(es) "
                             "(checkpoint: %s on %s); schedules follow the new length", self.epoch + 1,
                             self.iters_per_epoch, self.world_size, saved_ipe, saved_world)
            self.iteration = self.epoch * self.iters_per_epoch
        self.corrupt_skipped = int(extra.get("corrupt_skipped", 0))
        self.knn_history = list(extra.get("knn", []))
        self._warn_config_changes(info.config or {})
        self.log.info("resumed from %s at iteration %d, %s", self.checkpointer.loaded_from, self.iteration,
                      run_position(self.epoch, self.iteration - self.epoch * self.iters_per_epoch))

    def _warn_config_changes(self, saved: dict[str, Any]) -> None:
        current = config_to_dict(self.cfg)
        changed = [f"{section}.{key}: {saved[section][key]!r} -> {value!r}"
                   for section, values in current.items() if isinstance(values, dict) and section in saved
                   for key, value in values.items()
                   if key in saved[section] and saved[section][key] != value
                   and f"{section}.{key}" not in _RUN_CONTROL_KEYS]
        if changed:
            self.log.warning("config differs from the checkpoint's: %s", "; ".join(changed))

    def export_backbone(self, name: str = BACKBONE_FILE) -> Path | None:
        """Write the teacher backbone (part tokens kept) in the passreid export format (rank 0)."""
        if not self.is_main:
            return None
        export = export_backbone(self.meta.teacher_backbone(), self.cfg.model.arch, source="passreid pretrain",
                                 mode=self.cfg.crops.mode, epoch=self.epoch, iteration=self.iteration)
        return atomic_save(export, self.out / name)

    # ------------------------------------------------------------------ monitor
    def run_monitor(self) -> dict[str, float] | None:
        """kNN mAP / Rank-1 of the teacher backbone, logged under split ``knn``."""
        if self.monitor is None:
            return None
        start = time.perf_counter()
        scores = self.monitor.evaluate(self.meta.teacher_backbone(), autocast=self.amp.autocast)
        scores = {**scores, "epoch": float(self.epoch), "iteration": float(self.iteration)}
        self.knn_history.append(scores)
        self.metrics.write(self.iteration, split="knn", **scores)
        self.log.info("kNN monitor at epoch %d (iteration %d): mAP %.2f%%  Rank-1 %.2f%%  (%.1f s)", self.epoch,
                      self.iteration, 100 * scores["mAP"], 100 * scores["rank1"], time.perf_counter() - start)
        return scores

    # ------------------------------------------------------------------ one iteration
    def train_step(self, views: Views) -> tuple[float, dict[str, Any]]:
        """One optimizer step at ``self.iteration`` (see the module docstring for the order)."""
        it, epoch = self.iteration, self.epoch
        apply_schedule(self.optimizer, lr=self.schedules.lr[it], weight_decay=self.schedules.weight_decay[it])
        self.optimizer.zero_grad(set_to_none=True)
        views = [v.to(self.device, non_blocking=True) for v in views]
        loss, stats = self.meta.forward_backward(views, epoch, autocast=self.amp.autocast, scaler=self.amp.scaler,
                                                 iteration=it + 1)
        # The mean over ranks, so that every rank raises together instead of leaving the others waiting.
        mean_loss = check_finite(dist.all_reduce_mean(loss.detach().float().reshape(1)), it + 1, extra=stats)
        scaler = self.amp.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.cfg.optim.clip_grad > 0:
            self.meta.clip_gradients(self.cfg.optim.clip_grad)
        if epoch < self.cfg.optim.freeze_last_layer:
            self.meta.cancel_last_layer_grads()
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.meta.update_teacher(float(self.schedules.momentum[it]))
        self.iteration += 1
        return mean_loss, stats

    def _log_iteration(self, loss: float, stats: dict[str, Any], images_per_second: float) -> None:
        """The "train" record of the step just taken: step = ``self.iteration`` (steps done, so 1 for the first),
        epoch 1-based, lr / wd / momentum the values that step used."""
        it = self.iteration - 1  # index of the step just taken into the per-iteration schedules
        skipped = float(dist.all_reduce_mean(torch.tensor([float(self.corrupt_skipped)]))[0]) * self.world_size
        scalars = {"loss": loss, "lr": float(self.schedules.lr[it]), "wd": float(self.schedules.weight_decay[it]),
                   "momentum": float(self.schedules.momentum[it]), "epoch": float(self.epoch + 1),
                   "images_per_s": images_per_second, "corrupt_skipped": skipped}
        for key, value in stats.items():  # per-token losses, teacher entropies, temperature
            if isinstance(value, torch.Tensor) and value.numel() == 1 or isinstance(value, (int, float)):
                scalars.setdefault(key, float(value))
        for name, center in zip(self.meta.loss.token_names, self.meta.loss.centers()):
            scalars[f"center_norm_{name}"] = float(center.norm())
        remaining = self.total_iters - self.iteration
        scalars["eta_s"] = remaining * self.global_batch / images_per_second if images_per_second > 0 else math.nan
        self.metrics.write(self.iteration, **scalars)

    # ------------------------------------------------------------------ the loop
    def run(self) -> PretrainResult:
        """Train from the current state to the end (or to ``train.max_iters``, or until a
        pre-emption signal: then ``checkpoint.pth`` is written and the result says ``preempted``)."""
        with preemption_guard() as guard:
            return self._run(guard)

    def _run(self, guard: PreemptionGuard) -> PretrainResult:
        cfg = self.cfg
        if self._already_complete:
            self.log.info("training already complete (%d iterations); nothing to do", self.iteration)
            self._finish()
            return self._result(finished=True)
        if self.iteration == 0:
            self.run_monitor()
        progress = ProgressLogger(self.total_iters, cfg.train.log_period, self.log)
        window_start, window_images = time.perf_counter(), 0
        while self.epoch < cfg.train.epochs:
            done_in_epoch = self.iteration - self.epoch * self.iters_per_epoch
            for batch in batches_until_preempted(self.source.batches(self.epoch, done_in_epoch)):
                loss, stats = self.train_step(batch["views"])
                self.corrupt_skipped += int(batch["skipped"])
                window_images += self.global_batch
                progress.update(self.iteration - 1, loss=loss, lr=float(self.schedules.lr[self.iteration - 1]))
                if self.iteration % cfg.train.log_period == 0 or self.iteration == self.total_iters:
                    elapsed = time.perf_counter() - window_start
                    self._log_iteration(loss, stats, window_images / max(elapsed, 1e-9))
                    window_start, window_images = time.perf_counter(), 0
                every = cfg.train.checkpoint_period_iters
                saved = bool(every) and self.iteration % every == 0
                if saved:
                    self.save_checkpoint()
                preempted = guard.requested()
                if preempted or (cfg.train.max_iters and self.iteration >= cfg.train.max_iters):
                    return self._stop("pre-emption signal" if preempted else "train.max_iters",
                                      preempted=preempted, saved=saved)
            if self.iteration < (self.epoch + 1) * self.iters_per_epoch:  # the loader ended early: see
                return self._stop("pre-emption signal", preempted=True, saved=False)  # batches_until_preempted
            self._end_epoch()
            window_start, window_images = time.perf_counter(), 0  # throughput counts training only
        self._finish()
        return self._result(finished=True)

    def _stop(self, reason: str, preempted: bool, saved: bool) -> PretrainResult:
        """Stop mid-run with ``checkpoint.pth`` written (``saved``: the periodic one of this iteration)."""
        if not saved:
            self.save_checkpoint()
        self.log.info("stopping after iteration %d in epoch %d (%s); checkpoint written", self.iteration,
                      self.epoch + 1, reason)
        self.metrics.close()
        return self._result(finished=False, preempted=preempted)

    def _end_epoch(self) -> None:
        finished_epoch = self.epoch
        self.epoch += 1
        self.export_backbone()
        last = self.epoch == self.cfg.train.epochs
        if self.monitor is not None and (self.epoch % self.cfg.monitor.period == 0 or last):
            self.run_monitor()
        if self.epoch % self.cfg.train.checkpoint_period == 0 or last:
            keep = bool(self.cfg.train.keep_checkpoint_period) and self.epoch % self.cfg.train.keep_checkpoint_period == 0
            self.save_checkpoint(keep_copy=keep)
        self.metrics.flush()
        self.log.info("epoch %d/%d done (iteration %d)", finished_epoch + 1, self.cfg.train.epochs, self.iteration)

    def _finish(self) -> None:
        final = self.out / BACKBONE_FINAL_FILE
        if self.is_main and not (self._already_complete and final.is_file()):
            self.export_backbone(BACKBONE_FINAL_FILE)
            self.log.info("training finished: teacher backbone in %s", final)
        dist.barrier()
        self.metrics.close()

    def _result(self, finished: bool, preempted: bool = False) -> PretrainResult:
        backbone = self.out / BACKBONE_FILE
        return PretrainResult(output_dir=self.out, iteration=self.iteration, finished=finished,
                              knn=list(self.knn_history), backbone=backbone if backbone.is_file() else None,
                              preempted=preempted)


def run_pretraining(cfg: PretrainConfig, *, resume: bool = True,
                    batch_source: BatchSource | None = None) -> PretrainResult:
    """Run (or resume) the pre-training described by ``cfg``; see the module docstring.

    ``batch_source`` replaces the ``data.*`` pipeline by one's own (:class:`BatchSource`).
    """
    with preemption_guard():  # before the set-up: a pre-emption signal while data and model load is not lost
        return PretrainStage(cfg, resume=resume, batch_source=batch_source).run()


__all__ = [
    "BACKBONE_FILE",
    "BACKBONE_FINAL_FILE",
    "PretrainResult",
    "PretrainStage",
    "Schedules",
    "build_schedules",
    "peak_learning_rate",
    "run_pretraining",
]
