"""The Cluster-Contrast config (USL and UDA): the shared re-ID sections (:mod:`passreid.config.reid`) with
Cluster-Contrast defaults, plus clustering, memory and the step schedule.

Defaults are the PASS ViT-S/16 Cluster-Contrast recipe for Market-1501 USL (PASS-reID: PASS_cluster_contrast_reid/market_usl_cat_singleneck.sh and
examples/cluster_contrast_train_usl.py):
single-neck ``cat`` head with L2-normalised BN-neck output, drop-path 0.3, P x K = 32 x 8 = 256, 200
iterations per epoch, 50 epochs, SGD (momentum 0.9) lr 3.5e-4, weight decay 5e-4 on every trainable
parameter, StepLR(20, 0.1) per epoch, no warm-up; k-reciprocal Jaccard (k1 30, k2 6) + DBSCAN (eps 0.6,
min_samples 4) every epoch on the features as they are (``cluster.feat_norm``, ``eval.feat_norm``: false);
Cluster-Contrast's random erasing and bicubic test/cluster resize (``data.erasing``, ``data.test_interpolation``);
cluster memory with temperature 0.05, momentum 0.2 and the hard update; fp32.
Recipes in ``configs/usl/`` and ``configs/uda/`` change only what differs (eps 0.7 and ``mean`` fusion
for MSMT17, multi-neck and a source model for UDA).

UDA is the same loop started from a supervised model trained on the source domain (``model.init_from``,
a ``finetune/`` ``model_final.pth``): no source images are read during adaptation (PASS-reID's market_uda_cat.sh / msmt_uda_mean.sh).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from passreid.config import (RANDOM_INIT, EvalConfig, ReIDDataConfig, ReIDModelConfig, ReIDTrainConfig, require,
                             validate_reid_sections)
from passreid.cluster.knn import faiss_installed
from passreid.data import list_datasets
from passreid.models.cnn import is_cnn_arch

__all__ = [
    "ClusterConfig",
    "MemoryConfig",
    "UslConfig",
    "UslDataConfig",
    "UslModelConfig",
    "UslOptimConfig",
    "UslTrainConfig",
    "validate_usl_config",
]


@dataclass
class UslModelConfig(ReIDModelConfig):
    """The re-ID model section with the Cluster-Contrast defaults, plus the UDA source model."""

    drop_path_rate: float = 0.3  # PASS cluster-contrast parser default
    multi_neck: bool = False  # USL scripts: single neck; UDA scripts: --multi-neck
    normalize_necks: bool = True  # the published feature is the L2-normalised BN-neck output
    neck_feat: Literal["before", "after"] = "after"  # clustering, memory and test all use the BN-neck output
    # UDA: a finetune/ model_final.pth (or a finetune checkpoint.pth, or a published PASS/TransReID
    # supervised checkpoint) trained on the source domain. Its backbone is loaded; its BN necks and
    # classifier are dropped (and reported), as the published loader skips every 'bottleneck'/'classifier'
    # key. "" = start from model.pretrained (USL). Setting both is an error.
    init_from: str = ""


@dataclass
class UslDataConfig(ReIDDataConfig):
    """The target domain (its train split is clustered; labels there are used for monitoring only)."""

    batch_size: int = 256
    num_instances: int = 8
    num_workers: int = 4
    test_batch_size: int = 256
    # Cluster-Contrast's own transforms (PASS-reID PASS_cluster_contrast_reid/examples/
    # cluster_contrast_train_usl.py: T.RandomErasing(mean=[0.485, 0.456, 0.406]) from
    # clustercontrast/utils/data/transforms.py; T.Resize(..., interpolation=3) in the test/cluster loader).
    erasing: Literal["pixel", "cluster_contrast"] = "cluster_contrast"
    test_interpolation: Literal["bilinear", "bicubic"] = "bicubic"


@dataclass
class ClusterConfig:
    """Pseudo labels: k-reciprocal Jaccard distance + DBSCAN on the eval-mode train features."""

    eps: float = 0.6  # 0.6 Market-1501, 0.7 MSMT17 (PASS scripts)
    min_samples: int = 4
    k1: int = 30
    k2: int = 6
    knn_backend: Literal["auto", "torch", "faiss"] = "auto"  # passreid.cluster.knn backends (same neighbours)
    # L2-normalise the features before the Jaccard distance. false = the model output as it is, as published
    # (PASS-reID PASS_cluster_contrast_reid: cluster_contrast_train_usl.py -> faiss_rerank.py). Equal up to
    # rounding for the unit-norm single-neck (USL) feature; for the multi-neck (UDA) feature true changes the
    # pseudo labels (the normalised variant; pair it with eval.feat_norm=true).
    feat_norm: bool = False
    # Cluster purity / adjusted Rand index against the target train split's own labels, logged each epoch
    # (never used for training). Needs labels >= 0 on every train image (false for unlabeled sets).
    monitor_true_labels: bool = True


@dataclass
class MemoryConfig:
    """Cluster memory: cross-entropy over all normalised centroids, momentum update inside backward (PASS-reID: PASS_cluster_contrast_reid/clustercontrast/models/cm.py)."""

    temperature: float = 0.05
    momentum: float = 0.2
    use_hard: bool = True  # all PASS/SSL scripts pass --use-hard: one update per cluster with its hardest sample


@dataclass
class UslOptimConfig:
    """SGD/Adam over every trainable parameter with a per-epoch step schedule (examples/cluster_contrast_train_usl.py)."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 3.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    weight_decay_bias: float = 5e-4  # the published code has no separate bias group: same value
    bias_lr_factor: float = 1.0
    step_size: int = 20  # StepLR: lr x gamma every step_size epochs (stepped at the end of each epoch)
    gamma: float = 0.1
    warmup_epochs: int = 0  # linear warm-up epochs before the step schedule (none published)
    warmup_lr_factor: float = 0.01  # warm-up starts at lr x this


@dataclass
class UslTrainConfig(ReIDTrainConfig):
    """Loop length (epochs x iters), precision, checkpointing, and the single-process BN emulation."""

    epochs: int = 50
    iters: int = 200  # optimizer steps per epoch (the published IterLoader length)
    seed: int = 1
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "fp32"  # published: no AMP
    # >0: the BN necks normalise chunks of this many consecutive samples of the per-process batch, and only
    # the first chunk updates the running statistics: what nn.DataParallel did on the published 4-GPU
    # (Market, 64 per GPU) / 2-GPU (MSMT17, 128) runs, whose BN statistics follow the GPU count. 0 = the whole batch of
    # this process (DDP: per rank, which is DataParallel's behaviour already).
    ghost_bn_size: int = 0
    log_period: int = 50
    eval_at_start: bool = False  # also evaluate the starting model (the demos report start -> end)


@dataclass
class UslConfig:
    """Everything a USL/UDA run reads; saved as ``config.yaml`` and inside every checkpoint."""

    model: UslModelConfig = field(default_factory=UslModelConfig)
    data: UslDataConfig = field(default_factory=UslDataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: UslOptimConfig = field(default_factory=UslOptimConfig)
    # Published evaluation: squared L2 on the model output as it is (PASS-reID PASS_cluster_contrast_reid/
    # clustercontrast/evaluators.py, pairwise_distance), every 10 epochs and after the last.
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(period=10, feat_norm=False))
    train: UslTrainConfig = field(default_factory=UslTrainConfig)


def validate_usl_config(cfg: UslConfig) -> UslConfig:
    """Check value ranges and combinations (raising ``ConfigError`` naming the key), the shared re-ID sections'
    checks included."""
    model, cluster, memory, optim, train = cfg.model, cfg.cluster, cfg.memory, cfg.optim, cfg.train
    require(not (model.init_from and model.pretrained not in ("", RANDOM_INIT)), "model.init_from",
             "set either model.init_from (UDA: a source-trained fine-tuned model) or model.pretrained "
             "(USL: a backbone export), not both")
    require(not is_cnn_arch(model.arch), "model.arch",
            f"{model.arch} is a CNN feature-map backbone (fine-tuning method bpbreid only); Cluster Contrast needs a "
            "ViT (vit_tiny, vit_small, vit_base)")
    require(not model.jpm, "model.jpm", "Cluster Contrast uses the global branch only; set model.jpm=false")
    require(not model.sie_camera, "model.sie_camera",
             "Cluster Contrast has no camera embedding; set model.sie_camera=false")
    require(model.neck_feat == "after", "model.neck_feat",
             "Cluster Contrast trains, clusters and tests the BN-neck output: keep model.neck_feat=after")
    require(0.0 < cluster.eps, "cluster.eps", f"must be positive, got {cluster.eps}")
    require(cluster.min_samples >= 1, "cluster.min_samples", f"must be >= 1, got {cluster.min_samples}")
    require(cluster.k1 >= 1 and cluster.k2 >= 1, "cluster.k1", "k1 and k2 must be >= 1")
    require(cluster.knn_backend != "faiss" or faiss_installed(), "cluster.knn_backend",
            "faiss is not installed: pip install 'passreid[faiss]' (CPU) or 'passreid[gpu]', or use auto / torch")
    require(memory.temperature > 0, "memory.temperature", f"must be positive, got {memory.temperature}")
    require(0.0 <= memory.momentum < 1.0, "memory.momentum", f"must be in [0, 1), got {memory.momentum}")
    require(optim.lr > 0, "optim.lr", f"must be positive, got {optim.lr}")
    require(optim.step_size >= 1, "optim.step_size", f"must be >= 1, got {optim.step_size}")
    require(0.0 < optim.gamma <= 1.0, "optim.gamma", f"must be in (0, 1], got {optim.gamma}")
    require(optim.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {optim.warmup_epochs}")
    require(train.iters >= 1, "train.iters", f"must be >= 1, got {train.iters}")
    require(train.ghost_bn_size >= 0, "train.ghost_bn_size", "must be >= 0 (0 = the whole per-process batch)")
    validate_reid_sections(model, cfg.data, train, cfg.eval, list_datasets())
    return cfg


def ghost_bn_mismatch(batch_size: int, world_size: int, ghost_bn_size: int) -> str | None:
    """Why the BN necks will not see the recipe's ``train.ghost_bn_size`` chunks on ``world_size`` processes
    (each gets ``batch_size / world_size`` images), or ``None`` when they will (or ghost BN is off)."""
    per_process = batch_size // world_size
    if ghost_bn_size <= 0 or per_process % ghost_bn_size == 0:
        return None
    seen = f"{per_process} images at once" if per_process < ghost_bn_size else "a smaller last chunk"
    return (f"train.ghost_bn_size {ghost_bn_size} does not divide this process's batch of {per_process} images "
            f"(data.batch_size {batch_size} over {world_size} processes): the BN necks normalise {seen}, not the "
            f"recipe's chunks of {ghost_bn_size}; run on a number of processes that divides "
            f"{batch_size} / {ghost_bn_size}, or set train.ghost_bn_size")
