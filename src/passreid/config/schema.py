"""Reusable config sections that the stage schemas compose.

Defaults are the published recipes: PASS ViT-S/16 fine-tuning in the TransReID family
(256x128 input, P=16 x K=4 batches of 64, SGD lr 4e-4 with 20 warm-up epochs, cosine to
0.002x, 120 epochs, Euclidean distance on the normalised feature, no re-ranking; PASS-reID:
PASS_transreid/configs/market/vit_small.yml). A stage schema looks like::

    @dataclass
    class FinetuneConfig:
        model: ModelConfig = field(default_factory=ModelConfig)
        data: DataConfig = field(default_factory=DataConfig)
        optim: OptimConfig = field(default_factory=OptimConfig)
        eval: EvalConfig = field(default_factory=EvalConfig)
        train: TrainConfig = field(default_factory=TrainConfig)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import require


#: ``model.pretrained`` value that asks for random initialisation explicitly (an empty value is an error).
RANDOM_INIT = "none"


@dataclass
class ModelConfig:
    """The ViT backbone with PASS part tokens."""

    arch: Literal["vit_tiny", "vit_small", "vit_base"] = "vit_small"
    img_size: tuple[int, int] = (256, 128)  # (height, width) of the network input
    stride_size: int = 16  # patch-embedding stride; 12 or 11 gives overlapping patches
    drop_path_rate: float = 0.1
    num_part_tokens: int = 3  # PASS learnable part [CLS] tokens next to the global one
    # Checkpoint to start from. Required: empty is an error when a run loads weights; "none" = random init (warned).
    pretrained: str = ""
    hw_ratio: int = 2  # height/width ratio of the pre-training crops (position-embedding resize)


@dataclass
class DataConfig:
    """Which labelled re-ID set to read and how to batch it."""

    dataset: str = "market1501"  # a name from passreid.data.list_datasets()
    root: str = ""  # dataset folder; --data-root on the command line fills it
    version: Literal["", "v1", "v2"] = ""  # MSMT17 only, where it is required
    train_split: Literal["train", "trainval"] = "train"  # MSMT17 only
    num_workers: int = 8
    batch_size: int = 64  # global batch: P identities x num_instances images
    num_instances: int = 4  # K images per identity in a batch
    skip_corrupt: bool = False  # drop damaged / unreadable images (each logged) instead of failing at start-up


@dataclass
class OptimConfig:
    """SGD with per-parameter groups and a cosine schedule with linear warm-up (per epoch)."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 4e-4  # base lr for a global batch of 64 (0.008 for ImageNet-initialised ViT-B)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_bias: float = 1e-4
    bias_lr_factor: float = 2.0  # parameters named *bias* get lr x this
    warmup_epochs: int = 20
    warmup_lr_factor: float = 0.01  # warm-up starts at lr x this
    min_lr_factor: float = 0.002  # the cosine ends at lr x this


@dataclass
class EvalConfig:
    """Retrieval evaluation (CMC / mAP / mINP) and optional k-reciprocal re-ranking."""

    metric: str = "euclidean"  # distance for passreid.eval.rank_metrics
    # L2-normalise query/gallery features before the distance (TransReID's TEST.FEAT_NORM 'yes'); false = the
    # model output as it is (Cluster-Contrast's evaluator, where the UDA multi-neck feature is not unit-norm).
    feat_norm: bool = True
    max_rank: int = 50
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    period: int = 120  # evaluate every `period` epochs (and after the last one)
    # Precision of every eval-mode feature extraction (test features; Cluster-Contrast's clustering features).
    # The published codes extract them outside autocast: fp32. Same values as train.precision.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "fp32"


@dataclass
class TrainConfig:
    """Loop length, reproducibility, precision and where the run writes."""

    epochs: int = 120
    seed: int = 1234
    # Training autocast: "auto" (bf16 on Ampere+, fp16 + GradScaler on older GPUs, fp32 on CPU) is for demos;
    # the recipes of published rows pin what the published code ran (passreid.engine.amp).
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    log_period: int = 50  # iterations between log lines
    checkpoint_period: int = 1  # epochs between writes of checkpoint.pth (the resume point)
    checkpoint_period_iters: int = 0  # also write checkpoint.pth every N iterations (0: epoch ends only)
    # >0: stop after this many iterations in total with checkpoint.pth written (a longer run resumes from it);
    # fine-tuning and USL/UDA also evaluate and write model_final.pth there. 0: run every epoch.
    max_iters: int = 0
    device: str = "auto"  # auto (CUDA when available), cpu, cuda or cuda:N (passreid.engine.select_device)
    output_dir: str = "output"  # --output-dir on the command line fills it
    # Minutes a collective waits for the other processes before the run fails (the process group's timeout).
    # Rank 0 alone clusters (USL/UDA), scores the kNN monitor and writes files while the other ranks wait in
    # the next collective: PyTorch's NCCL default, 10 minutes, would end a run whose clustering takes longer
    # (~200k images). 30 is torch's gloo default and its NCCL default when the published code ran.
    dist_timeout_min: float = 30.0


def validate_train_config(train: TrainConfig) -> None:
    """Check the value ranges of the shared ``train`` fields; raise ``ConfigError`` naming the key."""
    require(train.epochs >= 1, "train.epochs", f"must be >= 1, got {train.epochs}")
    require(train.log_period >= 1, "train.log_period", f"must be >= 1, got {train.log_period}")
    require(train.max_iters >= 0, "train.max_iters", "must be >= 0 (0 = no cap)")
    require(train.checkpoint_period >= 1, "train.checkpoint_period", "must be >= 1 (epochs)")
    require(train.checkpoint_period_iters >= 0, "train.checkpoint_period_iters", "must be >= 0 (0: epoch ends only)")
    require(train.dist_timeout_min > 0, "train.dist_timeout_min", f"must be positive, got {train.dist_timeout_min}")
    require(0 <= train.seed < 2**32, "train.seed", f"must be in [0, 2**32 - 1], got {train.seed}")
