"""The fine-tuning config: the shared sections plus what supervised re-ID fine-tuning adds.

Defaults are the PASS ViT-S/16 recipe (finetune-occluded.md §0, §3.3, §4): PASS head with four BN
necks and ``cat`` fusion, pre-BN test feature, CE (no label smoothing) + soft-margin batch-hard
triplet 1:1, SGD lr 4e-4 with 20 warm-up epochs and cosine to 0.002x over 120 epochs, PASS's
end-of-epoch scheduler stepping. Recipes in ``configs/finetune/`` change only what differs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from passreid.config import ConfigError
from passreid.config.schema import DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig

__all__ = [
    "FinetuneConfig",
    "FinetuneDataConfig",
    "FinetuneModelConfig",
    "FinetuneOptimConfig",
    "FinetuneTrainConfig",
    "GENERATED_ROOT_PREFIX",
    "GENERATED_SUBSETS",
    "LossConfig",
    "validate_config",
]

#: ``data.root: "generated:market"`` renders the built-in world and reads its ``market/`` folder.
GENERATED_ROOT_PREFIX = "generated:"
GENERATED_SUBSETS = ("market", "market_occluded")


@dataclass
class FinetuneModelConfig(ModelConfig):
    """Backbone (shared ``ModelConfig`` fields) plus the re-ID head, SIE and JPM."""

    patch_size: int = 16
    head: Literal["pass", "cls"] = "pass"  # pass: BN necks on [CLS] + part tokens; cls: one BN on [CLS]
    feat_fusion: Literal["cat", "mean"] = "cat"  # PASS: cat(CLS, mean(P)) (2D) or (CLS + mean(P)) / 2 (D)
    multi_neck: bool = True  # PASS: one BN per token (MULTI_NECK); false: one BN over the fused vector
    neck_feat: Literal["before", "after"] = "before"  # test feature: pre-BN (all ViT recipes) or post-BN
    sie_camera: bool = False  # TransReID side information embedding of the camera id
    sie_coe: float = 3.0  # lambda of the SIE (TransReID YAMLs)
    jpm: bool = False  # TransReID jigsaw patch module
    jpm_shift: int = 5
    jpm_shuffle_groups: int = 2
    jpm_num_branches: int = 4
    jpm_rearrange: bool = True  # shift + shuffle before splitting (false: plain contiguous split)
    # Checkpoint keys that may be absent / left over when loading ``pretrained`` (fnmatch patterns);
    # e.g. ["part*"] for DINO / timm weights into a PASS-layout backbone. Nothing else is skipped.
    pretrained_allow_missing: list[str] = field(default_factory=list)
    pretrained_allow_unexpected: list[str] = field(default_factory=list)
    pretrained_which: Literal["teacher", "student"] = "teacher"  # network of a PASS/DINO training checkpoint


@dataclass
class FinetuneDataConfig(DataConfig):
    """Training set (shared ``DataConfig`` fields), a separate test set, subsets and augmentation."""

    test_dataset: str = ""  # "" = evaluate on `dataset`; e.g. occluded_reid after training on market1501
    test_root: str = ""  # "" = `root` (the reader accepts the dataset folder or its parent)
    world_dir: str = ""  # where `root: generated:<subset>` renders the world; "" = <output_dir>/../world
    world_seed: int = 0
    # Spec overrides of the generated world (passreid.data.synthetic.SyntheticWorldSpec fields), e.g.
    # {num_train_ids: 100}; a non-default world goes to its own folder <world_dir>-<hash> by default.
    world_options: dict[str, Any] = field(default_factory=dict)
    max_train_ids: int = 0  # >0: train on the first N (relabelled) identities only (debugging)
    max_test_ids: int = 0  # >0: evaluate on the first N query identities only (debugging)
    test_batch_size: int = 128
    flip_p: float = 0.5
    padding: int = 10
    erasing_p: float = 0.5
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass
class LossConfig:
    """Identity cross-entropy on post-BN features + batch-hard triplet on pre-BN features."""

    id_weight: float = 1.0
    triplet_weight: float = 1.0
    label_smoothing: float = 0.0  # epsilon; 0 = off, as in every ViT recipe (0.1 when on)
    triplet: Literal["soft_margin", "margin"] = "soft_margin"
    margin: float = 0.3  # only for triplet: margin


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """Shared optimiser fields plus the scheduler stepping convention (finetune-occluded.md §4.3)."""

    # "pass": epoch e (0-based) runs at the schedule value of e (step at epoch end; epoch 1 at warmup_lr_init).
    # "transreid": epoch e runs at the value of e + 1 (step(epoch) at the start of epochs 1..E).
    lr_stepping: Literal["pass", "transreid"] = "pass"


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """Shared loop fields plus an iteration cap and the device."""

    max_iters: int = 0  # >0: end the run (final evaluation, model_final.pth) after this many iterations in total
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda"
    # >0: torch intra-op CPU threads during the run (restored afterwards); 0 keeps torch's default. One thread
    # avoids oversubscription when small CPU runs share cores with other processes.
    num_threads: int = 0


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run reads; saved as ``config.yaml`` and inside every checkpoint."""

    method: str = "bnneck"  # a name from passreid.finetune.list_methods()
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def validate_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """Check the value ranges and combinations a type check cannot; raise ``ConfigError`` naming the key."""
    model, data, loss, optim = cfg.model, cfg.data, cfg.loss, cfg.optim
    _require(model.num_part_tokens >= 0, "model.num_part_tokens", f"must be >= 0, got {model.num_part_tokens}")
    _require(model.head != "pass" or model.num_part_tokens > 0, "model.head",
             "'pass' needs part tokens (model.num_part_tokens > 0); use head: cls for a plain [CLS] ViT")
    _require(model.stride_size > 0 and model.patch_size > 0, "model.stride_size",
             f"patch and stride must be positive, got {model.patch_size}, {model.stride_size}")
    _require(model.sie_coe > 0, "model.sie_coe", f"must be positive, got {model.sie_coe}")
    if model.jpm:
        _require(model.jpm_num_branches >= 1, "model.jpm_num_branches", "must be >= 1")
        _require(model.jpm_shuffle_groups >= 1, "model.jpm_shuffle_groups", "must be >= 1")
        _require(model.jpm_shift >= 1, "model.jpm_shift", "must be >= 1 (1 = no shift)")
    _require(data.batch_size % data.num_instances == 0, "data.batch_size",
             f"{data.batch_size} must be a multiple of data.num_instances ({data.num_instances})")
    _require(data.max_train_ids >= 0 and data.max_test_ids >= 0, "data.max_train_ids",
             "max_train_ids / max_test_ids must be >= 0 (0 = all)")
    _require(data.test_batch_size > 0, "data.test_batch_size", "must be positive")
    if data.root.startswith(GENERATED_ROOT_PREFIX):
        subset = data.root[len(GENERATED_ROOT_PREFIX):]
        _require(subset in GENERATED_SUBSETS, "data.root",
                 f"'{data.root}': the generated world has the subsets {list(GENERATED_SUBSETS)} "
                 f"(write e.g. 'generated:market')")
    _require(0.0 <= loss.label_smoothing < 1.0, "loss.label_smoothing",
             f"must be in [0, 1), got {loss.label_smoothing}")
    _require(loss.id_weight >= 0 and loss.triplet_weight >= 0, "loss.id_weight", "loss weights must be >= 0")
    _require(optim.lr > 0, "optim.lr", f"must be positive, got {optim.lr}")
    _require(optim.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {optim.warmup_epochs}")
    _require(cfg.train.epochs > 0, "train.epochs", f"must be positive, got {cfg.train.epochs}")
    _require(cfg.train.max_iters >= 0, "train.max_iters", "must be >= 0 (0 = no cap)")
    _require(cfg.train.num_threads >= 0, "train.num_threads", "must be >= 0 (0 = torch's default)")
    _require(cfg.eval.period > 0, "eval.period", f"must be positive, got {cfg.eval.period}")
    _require(cfg.train.checkpoint_period > 0, "train.checkpoint_period", "must be positive")
    _require(cfg.train.device in ("auto", "cpu", "cuda") or cfg.train.device.startswith("cuda:"),
             "train.device", f"must be auto, cpu, cuda or cuda:N, got {cfg.train.device!r}")
    return cfg


def default_world_dir(cfg: FinetuneConfig) -> Path:
    """Where ``data.root: generated:<subset>`` renders the world.

    ``data.world_dir`` if set, else ``<output_dir>/../world`` (shared by the runs next to each other, and
    by the other stages' demos: generation is idempotent). Worlds with ``data.world_options`` get a
    suffix derived from the options (``world-<hash>``), so differently shaped worlds never overwrite
    each other.
    """
    if cfg.data.world_dir:
        return Path(cfg.data.world_dir).expanduser()
    name = "world"
    if cfg.data.world_options:
        text = json.dumps(cfg.data.world_options, sort_keys=True)
        name += "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return Path(cfg.train.output_dir).expanduser().absolute().parent / name
