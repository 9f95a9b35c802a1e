"""The Cluster-Contrast loop for USL and UDA (PASS-reID: PASS_cluster_contrast_reid/examples/cluster_contrast_train_usl.py).

Per epoch: eval-mode features of the target train set (gathered in sample order under DDP) -> Jaccard +
DBSCAN on rank 0 -> pseudo labels broadcast -> outliers dropped -> a fresh cluster memory from the
normalised centroids -> ``train.iters`` P x K batches of the memory loss (the memory is updated inside
backward) -> evaluation every ``eval.period`` epochs. UDA is the same loop started from a source-trained
model (``model.init_from``); no source image is read. The network and the memory are one
:class:`~passreid.usl.meta_arch.ClusterContrastMetaArch`; each step calls its ``forward_backward``.

One run writes into ``train.output_dir``: ``config.yaml``, ``log.txt``, ``metrics.jsonl`` (``split``
"cluster" once per epoch: clusters, outliers, purity / ARI against the true ids when known, the epoch's
mean loss; "train" every ``train.log_period`` iterations; "eval" after each evaluation; at the end "last"
and "best_test_selected", see below), TensorBoard events, ``checkpoint.pth`` and ``model_final.pth`` (the
re-ID model file of :mod:`passreid.models.reid_file`, method ``bnneck``: ``finetune/test.py --weights`` and
:func:`passreid.finetune.load_finetuned_model` read it; its classifier holds the final cluster memory; it is the
*last* epoch's model).

Last vs best: the published runs evaluate every ``eval_step`` epochs and after the last one, keep the
checkpoint with the highest test mAP and report it (PASS-reID, PASS_cluster_contrast_reid/examples/
cluster_contrast_train_usl.py: ``is_best = mAP > best_mAP``, then "Test with the best model"): model selection
on the test set. A run here reports both, labelled: "last" (the final evaluation, the model in
``model_final.pth``) and "best (test-set selected)" (the evaluation with the highest mAP, the earlier one on a
tie; the starting-model evaluation of ``train.eval_at_start`` is not a candidate), in ``log.txt``,
``metrics.jsonl``, ``model_final.pth``'s meta and :class:`UslResult`. Compare a published number with "best".

Exact resume: at an epoch boundary the checkpoint holds the model, optimizer and RNG states, and the
resumed run re-clusters from the checkpointed model, which gives the same pseudo labels and memory as the
uninterrupted run. A checkpoint written mid-epoch (pre-emption, ``train.max_iters``) also stores the
epoch's pseudo labels and the current memory, so the epoch continues where it stopped. The continuation is
exact with any ``data.num_workers``: each sample's augmentation is seeded from its place in the epoch
(:class:`~passreid.data.samplers.SampleSeeds`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from passreid import dist
from passreid.cluster import NoClustersError
from passreid.config import ConfigError, config_to_dict, require
from passreid.data import DatasetFormatError, ImageItem, ReIDDataset, build_dataset, check_data_root, reader_options
from passreid.data.reid_sets import build_image_train_set, load_test_dataset
from passreid.engine import atomic_save, output_layout, preemption_guard, warmup_step_lr
from passreid.engine.optim import make_optimizer
from passreid.engine.trainer import Trainer, torch_threads
from passreid.eval.evaluator import EvalResult, evaluate_model, extract_split, format_result
from passreid.models.reid import ReIDModel, make_classifier
from passreid.models.reid_file import reid_file_config, reid_model_file
from passreid.usl.config import UslConfig, ghost_bn_mismatch, validate_usl_config
from passreid.usl.meta_arch import ClusterContrastMetaArch
from passreid.usl.model import build_usl_model
from passreid.usl.pseudo_labels import ClusterStats, PseudoLabels, cluster_centroids, cluster_features
from passreid.usl.sampler import PseudoLabelSampler

__all__ = ["ClusterContrastTrainer", "TargetData", "UslResult", "load_target_data", "run_cluster_contrast",
           "run_usl"]

logger = logging.getLogger("passreid.usl")


@dataclass
class UslResult:
    """Where a run ended. Metrics are rank 0's (``None`` elsewhere)."""

    output_dir: Path
    iterations: int
    epochs_completed: int
    final_metrics: dict[str, float] | None  # "last": the final evaluation (the model in model_final.pth)
    final_model: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per clustering step
    initial_metrics: dict[str, float] | None = None  # train.eval_at_start
    source: Any = None  # UDA: how the source model was read (passreid.uda.SourceLoad)
    preempted: bool = False
    # "best (test-set selected)": the evaluation with the highest test mAP and its epoch, as the published
    # numbers are selected (module docstring). Not a held-out estimate.
    best_metrics: dict[str, float] | None = None
    best_epoch: int | None = None


@dataclass
class TargetData:
    """The target domain: the (sorted) train images that are clustered, and the evaluation split."""

    train: list[ImageItem]
    test: ReIDDataset
    true_ids: np.ndarray | None  # train labels for monitoring only; None when unknown
    num_cameras: int


def load_target_data(cfg: UslConfig) -> TargetData:
    """Read the target set: its train split (or its unlabeled split) sorted by path, as published, and the
    query/gallery it is evaluated on."""
    name = cfg.data.dataset
    dataset = build_dataset(name, check_data_root(cfg.data.root), skip_corrupt=cfg.data.skip_corrupt,
                            **reader_options(name, cfg.data))
    items = dataset.train
    if not items:
        raise DatasetFormatError(f"dataset {name!r} at {dataset.root} has no train images to cluster (its train "
                                 f"split is empty); set data.dataset / data.root to a set with training images")
    items = sorted(items, key=lambda item: item.path)
    test = load_test_dataset(cfg.data, dataset if not cfg.data.test_dataset else None)
    true_ids = np.asarray([item.pid for item in items], dtype=np.int64)
    if not cfg.cluster.monitor_true_labels or (true_ids < 0).any():
        true_ids = None
    num_cameras = max(item.camid for item in items) + 1
    logger.info("target %s: %d train images to cluster (%s), %d cameras; evaluating on %s: %d query, %d gallery",
                name, len(items), "true ids known, monitoring purity/ARI" if true_ids is not None
                else "no true ids used", num_cameras, test.name, len(test.query), len(test.gallery))
    return TargetData(items, test, true_ids, num_cameras)


class ClusterContrastTrainer(Trainer):
    """Builds everything from the config; :meth:`run` clusters, trains, evaluates and saves."""

    log = logger
    stage_name = "Cluster Contrast"
    stage_label = "USL"  # in the set-up log line

    def __init__(self, cfg: UslConfig, resume: bool = True) -> None:
        super().__init__(validate_usl_config(cfg), resume)

    @property
    def train_module(self) -> nn.Module:
        return self.meta.forward_module

    # ------------------------------------------------------------------ set-up
    def _build(self, resuming: bool) -> None:
        cfg = self.cfg
        # Checked before the data and the first feature pass, not when the first epoch's sampler is built.
        require(cfg.data.batch_size % self.world_size == 0, "data.batch_size",
                f"{cfg.data.batch_size} images per step do not split over {self.world_size} processes: use a "
                f"number of processes that divides it")
        self.data = load_target_data(cfg)
        # A resumed run takes every weight from the checkpoint: model.pretrained / init_from are not read again.
        self.model, self.source = self._build_model(load_weights=not resuming)
        self.model.to(self.device)
        self.meta = ClusterContrastMetaArch(self.model, temperature=cfg.memory.temperature,
                                            momentum=cfg.memory.momentum, use_hard=cfg.memory.use_hard,
                                            ghost_bn_size=cfg.train.ghost_bn_size).to(self.device)
        self.memory = self.meta.memory  # reset from the centroids before each epoch; saved in the checkpoint
        # each group at its multiple (lr_multiplier) of the scheduled rate, see _epoch_lrs
        self.optimizer = make_optimizer(self.meta.param_groups(cfg.optim), cfg.optim)
        self.pending_epoch_state: dict[str, Any] | None = None
        self.labels: np.ndarray | None = None
        self.sampler: PseudoLabelSampler | None = None  # built by _prepare_epoch from the epoch's pseudo labels
        self.train_set = None
        self.history: list[dict[str, Any]] = []
        self.loss_sum, self.loss_count = 0.0, 0
        self.initial_metrics: dict[str, float] | None = None
        self.best: dict[str, Any] | None = None  # {"epoch", "iteration", "metrics"} of the highest test mAP

    def _build_model(self, load_weights: bool) -> tuple[ReIDModel, Any]:
        """The network and how its start was read (``None`` for USL: ``model.pretrained``); UDA overrides it."""
        return build_usl_model(self.cfg.model, load_weights=load_weights), None

    def _wrap_distributed(self) -> None:
        # A [CLS]-only head leaves the part tokens without gradient.
        unused = self.cfg.model.head == "cls" and self.cfg.model.num_part_tokens > 0
        self.meta.distribute(lambda net: self._ddp(net, find_unused_parameters=unused))

    def _log_setup(self) -> None:
        cfg = self.cfg
        logger.info("Cluster Contrast (%s) %s %dx%d, head %s/%s%s, feature dim %d; eps %.2f, k1 %d, k2 %d, "
                    "min_samples %d; memory tau %.3g momentum %.2f %s; %d process(es) on %s, %s",
                    self.stage_label, cfg.model.arch, *cfg.model.img_size, cfg.model.head,
                    cfg.model.feat_fusion, " multi-neck" if cfg.model.multi_neck else " single-neck",
                    self.model.feature_dim, cfg.cluster.eps, cfg.cluster.k1, cfg.cluster.k2, cfg.cluster.min_samples,
                    cfg.memory.temperature, cfg.memory.momentum, "hard" if cfg.memory.use_hard else "all-sample",
                    self.world_size, self.device, self.precision.describe())
        logger.info("random erasing %s, test/cluster resize %s; features %s before the Jaccard distance and %s "
                    "before the test distance", cfg.data.erasing, cfg.data.test_interpolation,
                    "L2-normalised" if cfg.cluster.feat_norm else "as output",
                    "L2-normalised" if cfg.eval.feat_norm else "as output")
        mismatch = ghost_bn_mismatch(cfg.data.batch_size, self.world_size, cfg.train.ghost_bn_size)
        if mismatch:
            logger.warning(mismatch)

    # ------------------------------------------------------------------ checkpoint state
    def _checkpoint_extra(self, stopped_in_epoch: int | None) -> dict[str, Any]:
        epoch_state = None
        if stopped_in_epoch is not None:  # the epoch's pseudo labels and memory, to continue it exactly
            epoch_state = {"epoch": stopped_in_epoch, "labels": torch.from_numpy(self.labels),
                           "memory": self.memory.features.detach().cpu().clone(),
                           "loss_sum": self.loss_sum, "loss_count": self.loss_count}
        return {"history": self.history, "initial_metrics": self.initial_metrics, "epoch_state": epoch_state,
                "memory": self.memory.features.detach().cpu().clone(), "best": self.best}

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        self.history = list(extra.get("history", []))
        self.initial_metrics = extra.get("initial_metrics")
        self.best = extra.get("best")
        self.pending_epoch_state = extra.get("epoch_state")
        if extra.get("memory") is not None:  # the memory as it ended (a finished run's final classifier)
            self.memory.features = extra["memory"].to(self.memory.features.device).clone()

    def _resume_note(self) -> str:
        return " (mid-epoch: pseudo labels and memory restored)" if self.pending_epoch_state else ""

    # ------------------------------------------------------------------ loop
    def _epoch_lengths(self) -> list[int]:
        return [self.cfg.train.iters] * self.cfg.train.epochs

    def _epoch_lrs(self, epoch: int) -> list[float]:
        """Every group at its multiple of the StepLR rate (biases may run at ``bias_lr_factor`` x)."""
        optim = self.cfg.optim
        rate = warmup_step_lr(epoch, optim.lr, optim.step_size, optim.gamma, optim.warmup_epochs,
                              optim.lr * optim.warmup_lr_factor)
        return [rate * group.get("lr_multiplier", 1.0) for group in self.optimizer.param_groups]

    def _build_schedules(self) -> dict[str, Any]:
        return self.epoch_schedules()

    def _before_epochs(self) -> None:
        if self.cfg.train.eval_at_start and self.iteration == 0 and self.initial_metrics is None:
            result = self._evaluate(label="starting model")
            self.initial_metrics = result.metrics if result is not None else None

    def _result(self, final_path: Path | None, preempted: bool) -> UslResult:
        best = self.best or {}
        return UslResult(self.output_dir, self.iteration, self.epoch, self.last_metrics, final_path,
                         list(self.history), self.initial_metrics, self.source, preempted,
                         best_metrics=best.get("metrics"), best_epoch=best.get("epoch"))

    # ------------------------------------------------------------------ clustering
    def _prepare_epoch(self, epoch: int) -> None:
        """Pseudo labels and memory for ``epoch``: restored from a mid-epoch checkpoint, else clustered."""
        state = self.pending_epoch_state
        self.pending_epoch_state = None
        if state is not None and state.get("epoch") == epoch:
            labels = state["labels"].numpy().astype(np.int64)
            self.memory.features = state["memory"].to(self.memory.features.device).clone()  # exactly as saved
            self.loss_sum, self.loss_count = state["loss_sum"], state["loss_count"]
        else:
            labels = self._cluster(epoch)
            self.loss_sum, self.loss_count = 0.0, 0
        self._build_epoch_data(labels)

    @torch.no_grad()
    def _cluster(self, epoch: int) -> np.ndarray:
        start = time.perf_counter()
        feats = extract_split(self.model, self.data.train, tuple(self.cfg.model.img_size), self.cfg, self.device,
                              autocast=self.eval_amp.autocast, rank=self.rank, world_size=self.world_size,
                              split="train (for clustering)")
        extract_seconds = time.perf_counter() - start
        outcome: tuple[np.ndarray, ClusterStats] | None = None
        if self.rank == 0:
            pseudo: PseudoLabels = cluster_features(torch.from_numpy(feats.feats), self.cfg.cluster,
                                                    self.data.true_ids, device=self.device)
            outcome = (pseudo.labels, pseudo.stats)
        labels, stats = dist.broadcast_object(outcome)
        if stats.num_clusters == 0:
            raise NoClustersError(
                f"epoch {epoch + 1}: DBSCAN (eps {self.cfg.cluster.eps}, min_samples {self.cfg.cluster.min_samples}) "
                f"found no cluster among {stats.num_samples} images: every image is an outlier. The features do "
                "not separate the images (a weak or collapsed model?); check model.pretrained / init_from or "
                "raise cluster.eps")
        # Every rank holds the same gathered features: the centroids need no communication.
        self.memory.reset(cluster_centroids(torch.from_numpy(feats.feats), labels))
        seconds = time.perf_counter() - start
        record = {"epoch": epoch + 1, **stats.scalars(), "extract_seconds": round(extract_seconds, 2),
                  "cluster_seconds": round(seconds - extract_seconds, 2)}
        self.history.append(record)
        logger.info("epoch %d clustering: %s (features %.1f s, Jaccard + DBSCAN %.1f s)", epoch + 1, stats.format(),
                    extract_seconds, seconds - extract_seconds)
        return labels

    def _build_epoch_data(self, labels: np.ndarray) -> None:
        keep = np.flatnonzero(labels >= 0)
        items = [ImageItem(self.data.train[i].path, int(labels[i]), self.data.train[i].camid) for i in keep]
        self.labels = labels
        self.train_set = build_image_train_set(items, self.cfg.data, tuple(self.cfg.model.img_size))
        self.sampler = PseudoLabelSampler([item.pid for item in items], [item.camid for item in items],
                                          self.cfg.data.batch_size, self.cfg.data.num_instances, self.cfg.train.iters,
                                          seed=self.cfg.train.seed, rank=self.rank, world_size=self.world_size)

    # ------------------------------------------------------------------ training
    def _step(self, batch: dict[str, Any]) -> dict[str, float]:
        images = batch["img"].to(self.device, non_blocking=True)
        targets = torch.as_tensor(batch["pid"]).to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.meta.forward_backward(images, targets, autocast=self.amp.autocast, scaler=self.amp.scaler,
                                          iteration=self.iteration + 1)  # raises on a NaN/Inf loss
        self._optimizer_step()
        if self.world_size > 1:  # log the loss of the global batch (the mean of the ranks' equal-size batches)
            loss = dist.all_reduce_mean(loss)
        value = float(loss)
        self.loss_sum += value
        self.loss_count += 1
        return {"loss": value, "lr": self.optimizer.param_groups[0]["lr"]}

    def _finish_epoch(self, epoch: int) -> None:
        """The epoch's "cluster" record, completed with its mean loss."""
        mean_loss = self.loss_sum / max(self.loss_count, 1)
        record = next((r for r in reversed(self.history) if r["epoch"] == epoch + 1), None)
        if record is not None:
            record["loss"] = mean_loss
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.metrics.write(self.iteration, split="cluster", **scalars)
        logger.info("epoch %d done (iteration %d): mean loss %.4f, lr %.3g", epoch + 1, self.iteration, mean_loss,
                    self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ outputs
    def _evaluate(self, label: str = "") -> EvalResult | None:
        result = evaluate_model(self.model, self.data.test, tuple(self.cfg.model.img_size), self.cfg, self.device,
                                autocast=self.eval_amp.autocast, rank=self.rank, world_size=self.world_size)
        if not label:
            self.last_eval_iteration = self.iteration
        if result is not None:
            if not label:
                self.last_metrics = result.metrics
            self.metrics.write(self.iteration, split="eval", epoch=self.epoch, **result.metrics)
            logger.info("evaluation on %s (%s):\n%s", self.data.test.name,
                        label or f"after epoch {self.epoch}, iteration {self.iteration}", format_result(result))
            if not label:
                self._track_best(result.metrics)
        return result

    def _track_best(self, metrics: dict[str, float]) -> None:
        """Keep the evaluation with the highest test mAP (the earlier one on a tie), as the published runs do."""
        if self.best is None or metrics["mAP"] > self.best["metrics"]["mAP"]:
            self.best = {"epoch": self.epoch, "iteration": self.iteration, "metrics": dict(metrics)}
        logger.info("best (test-set selected) so far: epoch %d, %s", self.best["epoch"],
                    _headline(self.best["metrics"]))

    def _report_last_and_best(self) -> None:
        """Log and record (``metrics.jsonl`` splits "last" and "best_test_selected") the final evaluation and
        the test-set selected best one, so a run compares like with like with the published numbers."""
        if self.last_metrics is None or self.best is None:
            return
        self.metrics.write(self.iteration, split="last", epoch=self.epoch, **self.last_metrics)
        self.metrics.write(self.best["iteration"], split="best_test_selected", epoch=self.best["epoch"],
                           **self.best["metrics"])
        logger.info("result on %s: last (epoch %d, model_final.pth): %s | best (test-set selected, as the published "
                    "numbers; epoch %d): %s", self.data.test.name, self.epoch, _headline(self.last_metrics),
                    self.best["epoch"], _headline(self.best["metrics"]))

    def _save_final_model(self) -> Path | None:
        path = None
        self._report_last_and_best()
        if self.memory.num_clusters == 0:
            raise RuntimeError("no cluster memory to save: the run has not clustered (resumed a checkpoint without "
                               "its memory?)")
        if self.rank == 0:
            # The final cluster memory becomes the classifier of the final clusters (num_classes = K).
            memory = self.memory.features.detach().cpu()
            classifier = make_classifier(memory.shape[1], memory.shape[0])
            with torch.no_grad():
                classifier.weight.copy_(memory)
            self.model.head.classifier = classifier.to(self.device)
            try:
                cfg = self.cfg
                final = reid_model_file(self.model, cfg.model, memory.shape[0], self.data.num_cameras, method="bnneck",
                                        config=reid_file_config("bnneck", cfg.model, cfg.data, cfg.eval))
            finally:
                self.model.head.classifier = None
            final["meta"].update(final_metrics=self.last_metrics, initial_metrics=self.initial_metrics,
                                 best_test_selected=self.best, cluster_history=self.history,
                                 usl_config=config_to_dict(self.cfg))
            path = atomic_save(final, output_layout(self.output_dir).final_model)
            logger.info("wrote %s (%d final clusters as the classifier)", path, memory.shape[0])
        dist.barrier()
        return path


def _headline(metrics: dict[str, float]) -> str:
    """``mAP 88.7%, Rank-1 95.0%`` from the evaluation scalars (fractions)."""
    return f"mAP {100 * metrics['mAP']:.1f}%, Rank-1 {100 * metrics['rank1']:.1f}%"


def run_usl(cfg: UslConfig, resume: bool = True) -> UslResult:
    """Cluster-Contrast USL with ``cfg`` (auto-resuming from ``<output_dir>/checkpoint.pth`` unless
    ``resume=False``). A run started from a source-domain model is UDA: :func:`passreid.uda.run_uda`."""
    if cfg.model.init_from:
        raise ConfigError("config key 'model.init_from': starting from a source-domain model is the UDA stage; "
                          "run passreid-uda (uda/train.py) or passreid.uda.run_uda")
    return run_cluster_contrast(ClusterContrastTrainer, cfg, resume)


def run_cluster_contrast(trainer_class: type[ClusterContrastTrainer], cfg: UslConfig, resume: bool = True) -> UslResult:
    """Run ``trainer_class`` on ``cfg`` with its thread count and the pre-emption guard."""
    # The guard goes in before the set-up: a pre-emption signal while data and model load is not lost.
    with torch_threads(cfg.train.num_threads), preemption_guard():
        return trainer_class(cfg, resume=resume).run()
