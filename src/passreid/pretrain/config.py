"""Typed configuration of the PASS / DINO pre-training stage.

Defaults are the published PASS recipe (PASS-reID: PASS/script/vit-s_full_lup-pass.sh and PASS/main_pass.py): ViT-S/16 on 256x128
globals and 128x64 locals, 2 + 9 views, four 65,536-way heads, AdamW with lr 5e-4 per 256
images (linear warm-up over 10 epochs, cosine to 1e-6), weight decay 0.04 -> 0.4, teacher EMA
0.996 -> 1, per-tensor clipping at 3.0, last layer frozen in epoch 0, 100 epochs, 128 images
per GPU. Recipes in ``configs/pretrain/`` only state what differs.

The sections reuse the shared pieces where their meaning is the same (:class:`TrainConfig`
gives ``epochs/seed/precision/log_period/checkpoint_period/output_dir``); the rest are
pre-training specific.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from passreid.config import TrainConfig, require, validate_train_config
from passreid.data import list_datasets

# Unlabeled sources: the two dataset-registry readers.
PRETRAIN_DATASETS = ("image_folder", "luperson_lmdb")
# The kNN monitor's name for the persons of a generated pool folder (passreid.pretrain.knn_monitor).
GENERATED_POOL = "generated_pool"
# The side of the ViTs' square patches: every crop must hold at least one.
PATCH_SIZE = 16


@dataclass
class PretrainDataConfig:
    """Where the unlabeled person crops come from and how they are batched."""

    # image_folder: every image under root (recursively) or the paths in file_list;
    # luperson_lmdb: the LUPerson LMDB release (keys_file optional).
    dataset: Literal["image_folder", "luperson_lmdb"] = "image_folder"
    root: str = ""  # --data-root on the command line fills it
    file_list: str = ""  # image_folder only: text file of image paths relative to root
    keys_file: str = ""  # luperson_lmdb only: pickled key list (default: keys.pkl next to the LMDB)
    num_workers: int = 10
    batch_size_per_gpu: int = 128  # PASS ViT-S: 128 x 8 GPUs; ViT-B: 64 x 8
    skip_corrupt: bool = False  # leave out files damaged at start-up, replace undecodable ones when read (logged)
    # Check every file's first/last bytes at start-up (passreid.data.images). LUPerson as 4.2 M files: one
    # open + two reads each, on every (re)start; false leaves it out (damaged files then fail when sampled).
    check_images: bool = True
    pin_memory: bool = True  # only used on CUDA
    # Where the multi-crop runs. cpu: the published PIL pipeline in the loader workers (PASS-reID: PASS/main_pass.py,
    # DataAugmentationDINO).
    # gpu: workers only decode and draw the random parameters (the same draws); crops, colour, blur and
    # normalisation run batched on train.device (passreid.data.device_multicrop; on a CPU device, on the CPU).
    augment_on: Literal["cpu", "gpu"] = "cpu"


@dataclass
class CropsConfig:
    """Multi-crop augmentation (``passreid.data.multicrop.MultiCropAugmentation``)."""

    global_size: tuple[int, int] = (256, 128)  # (height, width)
    local_size: tuple[int, int] = (128, 64)
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.8)  # PASS: relative to the band; DINO: to the image
    local_crops_number: int = 9  # PASS needs 9: three per horizontal band
    mode: Literal["pass", "dino"] = "pass"  # dino: whole-image locals, no part tokens


@dataclass
class PretrainModelConfig:
    """Student/teacher ViT and the DINO heads (one per token type in PASS mode)."""

    arch: Literal["vit_tiny", "vit_small", "vit_base"] = "vit_small"
    img_size: tuple[int, int] = (256, 128)  # the grid pos_embed is laid out for (= global crops)
    drop_path_rate: float = 0.1  # student only; the teacher uses 0
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True  # freeze weight_g of the weight-normed last layers (PASS default)


@dataclass
class PretrainOptimConfig:
    """AdamW with per-iteration cosine schedules (dinov2 / DINO style)."""

    lr: float = 5e-4  # per 256 images: peak lr = lr * global_batch / 256
    min_lr: float = 1e-6
    warmup_epochs: int = 10  # linear warm-up from 0 to the peak
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    clip_grad: float = 3.0  # per-tensor gradient-norm cap; 0 disables
    freeze_last_layer: int = 1  # epochs during which the heads' last layers get no update


@dataclass
class PretrainLossConfig:
    """Temperatures and centring of the DINO / PASS cross-entropy."""

    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9


@dataclass
class PretrainTrainConfig(TrainConfig):
    """Loop length, precision, logging and checkpoint cadence."""

    epochs: int = 100
    seed: int = 0
    log_period: int = 200  # iterations between log lines / metrics.jsonl records
    checkpoint_period: int = 1  # epochs between end-of-epoch writes of checkpoint.pth
    keep_checkpoint_period: int = 0  # keep a named copy checkpoint_<epoch:07d>.pth every N epochs (0: none)
    # torch.compile the student and teacher ViTs (PASSMetaArch.compile_backbones) with this mode; "none": eager,
    # as published. Equal to eager up to float rounding (same drop-path draws); reduce-overhead adds CUDA graphs.
    compile: Literal["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "none"
    # true: the student runs the 9 band-local views in one backbone pass, each with its band's [PART] token,
    # instead of one pass per band (false, as published). The same function in fewer kernel launches; the
    # drop-path masks a seed draws differ.
    batch_band_views: bool = False


@dataclass
class KnnMonitorConfig:
    """kNN retrieval of the teacher's features on a labeled set, to watch learning happen."""

    period: int = 10  # epochs between evaluations (also at the start and the end); 0 disables
    # A labeled name of passreid.data.list_datasets() (e.g. market1501), or "generated_pool": the persons of
    # a pool folder named <video>/<video>_<person>_<shot>.jpg (as the demo world writes), each seen in several
    # shots (see passreid.pretrain.knn_monitor).
    dataset: str = "market1501"
    # The folder of that set (generated_pool: the pool folder itself). Empty: no monitor (logged at start).
    root: str = ""
    img_size: tuple[int, int] = (256, 128)
    batch_size: int = 128
    metric: Literal["euclidean", "cosine"] = "cosine"
    feature: Literal["pass_fusion", "cls"] = "pass_fusion"  # cat(CLS, mean(parts)) or [CLS] only


@dataclass
class PretrainConfig:
    """Everything the pre-training stage reads."""

    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    optim: PretrainOptimConfig = field(default_factory=PretrainOptimConfig)
    loss: PretrainLossConfig = field(default_factory=PretrainLossConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    monitor: KnnMonitorConfig = field(default_factory=KnnMonitorConfig)


def validate_pretrain_config(cfg: PretrainConfig) -> None:
    """Reject settings the stage cannot run with: a :class:`ConfigError` naming the key and what is expected."""
    data, crops, model, optim, train, monitor = cfg.data, cfg.crops, cfg.model, cfg.optim, cfg.train, cfg.monitor
    require(data.dataset in PRETRAIN_DATASETS, "data.dataset", f"must be one of {PRETRAIN_DATASETS}")
    require(bool(data.root), "data.root",
            f"is empty: pass --data-root DIR (the {data.dataset} folder)")
    require(not data.file_list or data.dataset == "image_folder", "data.file_list",
            "applies to data.dataset=image_folder only")
    require(not data.keys_file or data.dataset == "luperson_lmdb", "data.keys_file",
            "applies to data.dataset=luperson_lmdb only")
    require(data.batch_size_per_gpu >= 1, "data.batch_size_per_gpu", "must be >= 1")
    require(data.num_workers >= 0, "data.num_workers", "must be >= 0")
    require(crops.local_crops_number >= 1, "crops.local_crops_number", "must be >= 1")
    require(crops.mode != "pass" or crops.local_crops_number == 9, "crops.local_crops_number",
            "must be 9 in PASS mode (three crops in each of the three horizontal bands, as PASS-reID's main_pass.py)")
    for name in ("global_scale", "local_scale"):
        low, high = getattr(crops, name)
        require(0 < low <= high <= 1, f"crops.{name}", f"must satisfy 0 < low <= high <= 1, got {(low, high)}")
    for name in ("global_size", "local_size"):  # the ViT cuts every view into 16x16 patches
        height, width = getattr(crops, name)
        require(height >= PATCH_SIZE and width >= PATCH_SIZE, f"crops.{name}",
                f"must be at least {PATCH_SIZE}x{PATCH_SIZE} (one ViT patch), got {height}x{width}")
    for name in ("out_dim", "hidden_dim", "bottleneck_dim"):
        require(getattr(model, name) >= 1, f"model.{name}", "must be >= 1")
    require(0 <= model.drop_path_rate < 1, "model.drop_path_rate", "must be in [0, 1)")
    require(optim.lr > 0, "optim.lr", "must be > 0")
    require(optim.min_lr >= 0, "optim.min_lr", "must be >= 0")
    require(0 <= optim.warmup_epochs <= train.epochs, "optim.warmup_epochs", f"must be in [0, train.epochs={train.epochs}]")
    require(optim.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 disables clipping)")
    require(optim.freeze_last_layer >= 0, "optim.freeze_last_layer", "must be >= 0")
    require(0 <= optim.momentum_teacher <= optim.momentum_teacher_end <= 1, "optim.momentum_teacher",
            "needs 0 <= optim.momentum_teacher <= optim.momentum_teacher_end <= 1")
    loss = cfg.loss
    for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        require(getattr(loss, name) > 0, f"loss.{name}", f"must be > 0, got {getattr(loss, name)}")
    require(0 <= loss.warmup_teacher_temp_epochs <= train.epochs, "loss.warmup_teacher_temp_epochs",
            f"must be in [0, train.epochs={train.epochs}]")
    require(0 <= loss.center_momentum <= 1, "loss.center_momentum", "must be in [0, 1]")
    validate_train_config(train)
    require(train.keep_checkpoint_period >= 0, "train.keep_checkpoint_period", "must be >= 0")
    require(not train.batch_band_views or crops.mode == "pass", "train.batch_band_views",
            "applies to crops.mode=pass only (the dino mode's local views have no bands)")
    require(monitor.period >= 0, "monitor.period", "must be >= 0 (0 disables the kNN monitor)")
    require(monitor.batch_size >= 1, "monitor.batch_size", "must be >= 1")
    monitor_sets = [GENERATED_POOL, *list_datasets()]
    require(monitor.dataset in monitor_sets, "monitor.dataset", f"must be one of {monitor_sets}, got {monitor.dataset!r}")
