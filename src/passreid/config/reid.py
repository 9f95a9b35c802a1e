"""The re-ID sections every supervised or unsupervised re-ID stage shares: the model (ViT + BNNeck head, SIE,
JPM), the labelled data set with its test split and augmentation, and the loop settings.

Fine-tuning (:mod:`passreid.finetune`) and Cluster Contrast (:mod:`passreid.usl`, :mod:`passreid.uda`) compose
their configs from these sections (USL/UDA subclass them with their own defaults), build their model with
:func:`passreid.models.factory.build_reid_model`, read data with :mod:`passreid.data.reid_sets` and write the
re-ID model file of :mod:`passreid.models.reid_file`, so neither stage depends on the other. Defaults are the
PASS ViT-S/16 fine-tuning recipe (PASS-reID: PASS_transreid/configs/market/vit_small.yml).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from .errors import require
from .schema import DataConfig, EvalConfig, ModelConfig, TrainConfig, validate_train_config

__all__ = ["ReIDDataConfig", "ReIDModelConfig", "ReIDTrainConfig", "validate_reid_sections"]


@dataclass
class ReIDModelConfig(ModelConfig):
    """Backbone (shared ``ModelConfig`` fields) plus the re-ID head, SIE and JPM."""

    # A ViT, or (method bpbreid only) a CNN feature-map backbone of the published BPBReID (passreid.models.cnn):
    # hrnet_w32 / resnet50, ImageNet weights from the file in `pretrained`; the ViT-only keys below are then unused.
    arch: Literal["vit_tiny", "vit_small", "vit_base", "hrnet_w32", "resnet50"] = "vit_small"
    patch_size: int = 16
    head: Literal["pass", "cls"] = "pass"  # pass: BN necks on [CLS] + part tokens; cls: one BN on [CLS]
    feat_fusion: Literal["cat", "mean"] = "cat"  # PASS: cat(CLS, mean(P)) (2D) or (CLS + mean(P)) / 2 (D)
    multi_neck: bool = True  # PASS: one BN per token (MULTI_NECK); false: one BN over the fused vector
    # L2-normalise every BN-neck output before fusing them (the post-BN feature of PASS Cluster Contrast,
    # PASS-reID: PASS_cluster_contrast_reid/clustercontrast/models/vision_transformer.py); false: fuse the raw
    # BN outputs (supervised PASS/TransReID).
    normalize_necks: bool = False
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
class ReIDDataConfig(DataConfig):
    """Training set (shared ``DataConfig`` fields), a separate test set, subsets and augmentation."""

    test_dataset: str = ""  # "" = evaluate on `dataset`; e.g. occluded_reid after training on market1501
    test_root: str = ""  # "" = `root` (the reader accepts the dataset folder or its parent)
    max_train_ids: int = 0  # >0: train on the first N (relabelled) identities only (debugging)
    max_test_ids: int = 0  # >0: evaluate on the first N query identities only (debugging)
    test_batch_size: int = 128
    flip_p: float = 0.5
    padding: int = 10
    erasing_p: float = 0.5
    # Random erasing of the standard pipeline (passreid.data.transforms): "pixel" = timm's, as TransReID / PASS
    # fine-tuning; "cluster_contrast" = Cluster-Contrast's (constant ImageNet-mean fill, area 0.02-0.4, uniform
    # aspect, 100 tries). The mask-aware pipeline has its own data.mask_erasing.
    erasing: Literal["pixel", "cluster_contrast"] = "pixel"
    # Resize of the test pipeline (evaluation; USL/UDA also the clustering features): "bilinear" = TransReID's
    # T.Resize default; "bicubic" = Cluster-Contrast's test loader. Training always resizes bicubic.
    test_interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # ColorJitter(brightness, contrast, saturation, hue) right after the resize; [] = off. DPM's Occluded-REID
    # recipe uses [0.3, 0.3, 0.2, 0.2] (DPM: datasets/make_dataloader.py, a line to un-comment for Occluded-REID).
    color_jitter: list[float] = field(default_factory=list)
    # Occluder paste (passreid.data.occluders): a folder of RGBA cut-outs (*.png; the demo world's occluders/,
    # or tools/prepare_occluders.py's output); "" = off. Pasted with probability occluder_p,
    # covering occluder_area (min, max) of the image (its bounding box), before every other augmentation.
    occluder_dir: str = ""
    occluder_p: float = 0.5
    occluder_area: tuple[float, float] = (0.1, 0.4)
    # Human-parsing masks (BPBReID format, passreid.data.masks), loaded for training only when the method needs
    # them (bpbreid; pass_parts with visibility_target: masks): <dataset>/masks/<masks_dir>/<split>/<stem><suffix>.
    masks_dir: str = "pifpaf_maskrcnn_filtering"
    masks_suffix: str = ""  # "" = the dataset's published suffix (passreid.data.masks.PUBLISHED_MASK_SUFFIXES)
    mask_preprocess: str = "five_v"  # grouping of the 36 PifPaf fields into K parts: five_v | eight | full
    mask_background: Literal["threshold", "sum", "diff_from_max"] = "threshold"
    mask_background_threshold: float = 0.5  # threshold strategy: background where max_k part_k < this
    mask_softmax_weight: float = 15.0  # softmax(w * [bg, parts]) over channels; 0 = divide by the channel sum
    mask_scale: int = 4  # training masks at (H / mask_scale, W / mask_scale)
    # Random erasing of the mask-aware pipeline: BPBReID's CoarseDropout or the TransReID 'pixel' erasing.
    mask_erasing: Literal["coarse_dropout", "pixel"] = "coarse_dropout"


@dataclass
class ReIDTrainConfig(TrainConfig):
    """Shared loop fields plus CPU threads and the multi-process batch semantics."""

    # >0: torch intra-op CPU threads during the run (restored afterwards); 0 keeps torch's default. One thread
    # avoids oversubscription when small CPU runs share cores with other processes.
    num_threads: int = 0
    # What the loss and BatchNorm see with N > 1 processes. "global": the whole data.batch_size batch, as on the
    # one GPU of the published runs (model outputs gathered from every rank before the loss, so triplet mining,
    # CE and every mean run over the global batch; BatchNorm layers synchronised). "local": each rank's shard
    # (batch_size / N images: mining and BN statistics within the shard, gradients averaged by DDP).
    ddp_batch: Literal["global", "local"] = "global"


def validate_reid_sections(model: ReIDModelConfig, data: ReIDDataConfig, train: ReIDTrainConfig,
                           eval_cfg: EvalConfig, known_datasets: Sequence[str]) -> None:
    """Check the value ranges and combinations of the shared sections a type check cannot; raise
    ``ConfigError`` naming the key. ``known_datasets`` are the names ``data.dataset`` may take (the stage passes
    ``passreid.data.list_datasets()``: the data package builds on this one, so it cannot be imported here)."""
    require(model.num_part_tokens >= 0, "model.num_part_tokens", f"must be >= 0, got {model.num_part_tokens}")
    require(model.head != "pass" or model.num_part_tokens > 0, "model.head",
             "'pass' needs part tokens (model.num_part_tokens > 0); use head: cls for a plain [CLS] ViT")
    require(model.stride_size > 0 and model.patch_size > 0, "model.stride_size",
             f"patch and stride must be positive, got {model.patch_size}, {model.stride_size}")
    require(model.sie_coe > 0, "model.sie_coe", f"must be positive, got {model.sie_coe}")
    if model.jpm:
        require(model.jpm_num_branches >= 1, "model.jpm_num_branches", "must be >= 1")
        require(model.jpm_shuffle_groups >= 1, "model.jpm_shuffle_groups", "must be >= 1")
        require(model.jpm_shift >= 1, "model.jpm_shift", "must be >= 1 (1 = no shift)")
    require(data.num_instances >= 1 and data.batch_size >= 1, "data.num_instances",
            f"batch_size and num_instances must be >= 1, got {data.batch_size}, {data.num_instances}")
    require(data.batch_size % data.num_instances == 0, "data.batch_size",
             f"{data.batch_size} must be a multiple of data.num_instances ({data.num_instances})")
    require(data.max_train_ids >= 0 and data.max_test_ids >= 0, "data.max_train_ids",
             "max_train_ids / max_test_ids must be >= 0 (0 = all)")
    require(data.test_batch_size > 0, "data.test_batch_size", "must be positive")
    known = list(known_datasets)
    require(data.dataset in known, "data.dataset", f"unknown dataset {data.dataset!r}; valid names: {', '.join(known)}")
    require(data.test_dataset in ("", *known), "data.test_dataset",
            f"unknown dataset {data.test_dataset!r}; valid names: {', '.join(known)} (or empty: data.dataset's)")
    require(len(data.color_jitter) in (0, 4) and all(v >= 0 for v in data.color_jitter), "data.color_jitter",
             f"must be [] or [brightness, contrast, saturation, hue] (>= 0), got {data.color_jitter}")
    require(0.0 <= data.occluder_p <= 1.0, "data.occluder_p", f"must be a probability, got {data.occluder_p}")
    require(0.0 < data.occluder_area[0] <= data.occluder_area[1] <= 1.0, "data.occluder_area",
             f"must be (min, max) with 0 < min <= max <= 1, got {data.occluder_area}")
    require(data.mask_scale >= 1, "data.mask_scale", f"must be >= 1, got {data.mask_scale}")
    validate_train_config(train)
    require(train.num_threads >= 0, "train.num_threads", "must be >= 0 (0 = torch's default)")
    require(eval_cfg.period > 0, "eval.period", f"must be positive, got {eval_cfg.period}")
