"""The fine-tuning config: the shared sections plus what supervised re-ID fine-tuning adds.

Defaults are the PASS ViT-S/16 recipe (PASS-reID: PASS_transreid/configs/market/vit_small.yml and
model/make_model.py, ``build_transformer_pass``): PASS head with four BN
necks and ``cat`` fusion, pre-BN test feature, CE (no label smoothing) + soft-margin batch-hard
triplet 1:1, SGD lr 4e-4 with 20 warm-up epochs and cosine to 0.002x over 120 epochs, PASS's
end-of-epoch scheduler stepping. Recipes in ``configs/finetune/`` change only what differs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from passreid.config import require
from passreid.config.schema import DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig
from passreid.models.cnn import is_cnn_arch

__all__ = [
    "FinetuneConfig",
    "FinetuneDataConfig",
    "FinetuneModelConfig",
    "FinetuneOptimConfig",
    "FinetuneTrainConfig",
    "DPMConfig",
    "BPBReIDConfig",
    "PassPartsConfig",
    "TSDConfig",
    "DPEFormerConfig",
    "LossConfig",
    "validate_config",
]

@dataclass
class FinetuneModelConfig(ModelConfig):
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
class FinetuneDataConfig(DataConfig):
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
class LossConfig:
    """Identity cross-entropy on post-BN features + batch-hard triplet on pre-BN features."""

    id_weight: float = 1.0
    triplet_weight: float = 1.0
    label_smoothing: float = 0.0  # epsilon; 0 = off, as in every ViT recipe (0.1 when on)
    triplet: Literal["soft_margin", "margin"] = "soft_margin"
    margin: float = 0.3  # only for triplet: margin


@dataclass
class DPMConfig:
    """Dynamic Prototype Mask (``method: dpm``; DPM: configs/OCC_Duke/dpm.yml). Unused by other methods."""

    mask_blocks: list[int] = field(default_factory=lambda: [2, 4, 10, 12])  # 1-based blocks feeding the mask generator
    orth_weight: float = 0.1  # weight of the orthogonality loss (0.01 for the Occluded-REID recipe)
    arc_scale: float = 30.0  # masked ArcFace s
    arc_margin: float = 0.5  # masked ArcFace m (0.3 in DPM's Market-1501 config, i.e. for Occluded-REID)
    mask_lr: float = 0.0  # SGD lr of the mask generator's own optimizer (biases x optim.bias_lr_factor); 0 = optim.lr


@dataclass
class BPBReIDConfig:
    """BPBReID (``method: bpbreid``). Defaults are the published GiLt recipe (bpbreid:
    configs/bpbreid/bpbreid_occ_duke_train.yaml over torchreid/scripts/default_config.py)."""

    dim_reduce: int = 512  # Linear(C, 512) + BN + ReLU after pooling, one per embedding type
    id_weight_global: float = 1.0  # GiLt: identity (CE, label smoothing) on global, foreground, concat-parts
    id_weight_foreground: float = 1.0
    id_weight_concat: float = 1.0
    triplet_weight_parts: float = 1.0  # part-averaged batch-hard triplet on the K part embeddings
    triplet_weight_foreground: float = 0.0  # 1 in the Market-1501 / Occluded-REID configs
    triplet_margin: float = 0.3
    label_smoothing: float = 0.1
    pixel_ce_weight: float = 0.35  # body-part attention loss (0.7 for Occluded-REID)
    pixel_label_smoothing: float = 0.1
    visibility: Literal["binary", "continuous"] = "binary"  # test visibility scores (distance weights)


@dataclass
class PassPartsConfig:
    """PASS part tokens as parts (``method: pass_parts``): learned visibility + visibility-aware distance."""

    # Target of each part token's visibility head: "masks" = body pixels in its third of the image (parsing
    # masks, training only); "erasing" = the share of its third left by padding/random erasing (no masks).
    visibility_target: Literal["masks", "erasing"] = "masks"
    visibility_threshold: float = 0.1  # target 1 iff that share >= this (use ~0.5 with "erasing")
    visibility_weight: float = 1.0  # weight of the binary cross-entropy of the visibility heads
    part_id_weight: float = 1.0  # identity CE on each part token (own BN + classifier), visible parts only


@dataclass
class TSDConfig:
    """Teacher-Student Decoder (``method: tsd``). Defaults are the published recipe (TSD: run_tsd.sh)."""

    decoder_heads: int = 8  # heads of the decoder's self- and cross-attention
    ffn_ratio: int = 4  # decoder FFN width = ffn_ratio x D
    with_fore_head: bool = True  # MODEL.WITH_FORE_HEAD: foreground head (pooling with sum_k pi_k) + its CE
    # Teacher cross-attention mask: "sampled" = 1[u < pi] from the predicted parsing (published); "target" = the
    # one-hot of the training masks' argmax (the variant left commented out in the released code).
    teacher_mask: Literal["sampled", "target"] = "sampled"
    id_weight: float = 1.0  # CE (no label smoothing) on each of global, cat, cat_m, aux, fg
    triplet_weight: float = 1.0  # soft triplet on g + part-averaged soft triplet on student / pooled / teacher parts
    visibility_weight: float = 1.0  # sigmoid focal loss of the visibility predictor
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    mimic_weight: float = 1.0  # 1 - cos(student parts, teacher parts.detach())
    parsing_weight: float = 1.0  # MODEL.MASK_LOSS_WEIGHT: pixel CE of the parsing classifier
    parsing_label_smoothing: float = 0.1
    diversity_weight: float = 1.0  # MODEL.WITH_DIVERSE_LOSS (0 = off): teacher parts + detached-pi pooled parts
    visibility_threshold: float = 0.5  # test: part visible iff sigmoid(visibility logit) > this


@dataclass
class DPEFormerConfig:
    """DPEFormer (``method: dpeformer``; arXiv 2402.10435). Defaults are the paper's method."""

    # Global token g of DPSM/FBM and of the global classifier: "cls" = [CLS] (paper); "first_patch" = the first
    # patch token x[:, 1] after the final LN (what the released code takes).
    global_token: Literal["cls", "first_patch"] = "cls"
    # View 2 of each sample: "occluder" = view 1 with an occluder cut-out pasted (the paper's realistic occlusion
    # augmentation; cut-outs from data.occluder_dir, area data.occluder_area, always applied); "erasing" = random
    # erasing of view 1 (p 1, area erasing_area, pixel noise), what the released code does.
    view2: Literal["occluder", "erasing"] = "occluder"
    erasing_area: tuple[float, float] = (0.05, 0.4)
    num_parts: int = 4  # stripes and DPSM parts
    min_selected: int = 24  # DPSM: the first-difference cut k_b is clipped to >= this (24 of 128 tokens at 256x128)
    fbm_token_dim: int = 16  # FBM: a D-dim part / global vector is read as D / 16 tokens of 16 dims
    fbm_heads: int = 2
    fbm_mlp_ratio: float = 1.0
    # FBM head merge: "per_image" (paper); "released_batch_mix" = the released code's transpose/reshape, which mixes
    # the heads of pairs of images of a batch, so features depend on the batch (only to reproduce released models).
    fbm_head_merge: Literal["per_image", "released_batch_mix"] = "per_image"
    global_id_weight: float = 2.0  # weight of the mean CE of the two global classifiers
    memory_temperature: float = 0.05
    memory_momentum: float = 0.2  # bank row <- m * row + (1 - m) * feature, renormalised (view 1 only)
    memory_weight: float = 1.0  # memory loss of view 1 (updates the bank)
    memory_weight_view2: float = 0.3  # memory loss of view 2 (no update)


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """Shared optimiser fields plus the scheduler stepping convention.

    TransReID steps the scheduler at the start of each epoch (TransReID: processor/processor.py), PASS at its
    end (PASS-reID: PASS_transreid/processor/processor.py).
    """

    # "pass": epoch e (0-based) runs at the schedule value of e (step at epoch end; epoch 1 at warmup_lr_init).
    # "transreid": epoch e runs at the value of e + 1 (step(epoch) at the start of epochs 1..E).
    lr_stepping: Literal["pass", "transreid"] = "pass"
    # "cosine": warm-up + cosine (above fields); "warmup_multistep": linear warm-up from lr x warmup_lr_factor over
    # warmup_epochs, then x gamma at each epoch in milestones (torchreid / BPBReID: 10 epochs, [40, 70], 0.1).
    scheduler: Literal["cosine", "warmup_multistep"] = "cosine"
    milestones: list[int] = field(default_factory=lambda: [40, 70])
    gamma: float = 0.1


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """Shared loop fields plus CPU threads and the multi-process batch semantics."""

    # >0: torch intra-op CPU threads during the run (restored afterwards); 0 keeps torch's default. One thread
    # avoids oversubscription when small CPU runs share cores with other processes.
    num_threads: int = 0
    # What the loss and BatchNorm see with N > 1 processes. "global": the whole data.batch_size batch, as on the
    # one GPU of the published runs (model outputs gathered from every rank before the loss, so triplet mining,
    # CE and every mean run over the global batch; BatchNorm layers synchronised). "local": each rank's shard
    # (batch_size / N images: mining and BN statistics within the shard, gradients averaged by DDP).
    ddp_batch: Literal["global", "local"] = "global"


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
    dpm: DPMConfig = field(default_factory=DPMConfig)
    bpbreid: BPBReIDConfig = field(default_factory=BPBReIDConfig)
    pass_parts: PassPartsConfig = field(default_factory=PassPartsConfig)
    tsd: TSDConfig = field(default_factory=TSDConfig)
    dpeformer: DPEFormerConfig = field(default_factory=DPEFormerConfig)


def validate_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """Check the value ranges and combinations a type check cannot; raise ``ConfigError`` naming the key."""
    model, data, loss, optim = cfg.model, cfg.data, cfg.loss, cfg.optim
    require(not is_cnn_arch(model.arch) or cfg.method == "bpbreid", "model.arch",
             f"{model.arch} is a CNN feature-map backbone, used by method bpbreid only (method is {cfg.method!r}); "
             "the other methods need a ViT (vit_tiny, vit_small, vit_base)")
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
    require(data.batch_size % data.num_instances == 0, "data.batch_size",
             f"{data.batch_size} must be a multiple of data.num_instances ({data.num_instances})")
    require(data.max_train_ids >= 0 and data.max_test_ids >= 0, "data.max_train_ids",
             "max_train_ids / max_test_ids must be >= 0 (0 = all)")
    require(data.test_batch_size > 0, "data.test_batch_size", "must be positive")
    require(len(data.color_jitter) in (0, 4) and all(v >= 0 for v in data.color_jitter), "data.color_jitter",
             f"must be [] or [brightness, contrast, saturation, hue] (>= 0), got {data.color_jitter}")
    require(0.0 <= data.occluder_p <= 1.0, "data.occluder_p", f"must be a probability, got {data.occluder_p}")
    require(0.0 < data.occluder_area[0] <= data.occluder_area[1] <= 1.0, "data.occluder_area",
             f"must be (min, max) with 0 < min <= max <= 1, got {data.occluder_area}")
    require(data.mask_scale >= 1, "data.mask_scale", f"must be >= 1, got {data.mask_scale}")
    require(list(optim.milestones) == sorted(optim.milestones), "optim.milestones",
             f"must be increasing epochs, got {optim.milestones}")
    require(0.0 <= loss.label_smoothing < 1.0, "loss.label_smoothing",
             f"must be in [0, 1), got {loss.label_smoothing}")
    require(loss.id_weight >= 0 and loss.triplet_weight >= 0, "loss.id_weight", "loss weights must be >= 0")
    require(optim.lr > 0, "optim.lr", f"must be positive, got {optim.lr}")
    require(optim.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {optim.warmup_epochs}")
    require(cfg.train.epochs > 0, "train.epochs", f"must be positive, got {cfg.train.epochs}")
    require(cfg.train.max_iters >= 0, "train.max_iters", "must be >= 0 (0 = no cap)")
    require(cfg.train.num_threads >= 0, "train.num_threads", "must be >= 0 (0 = torch's default)")
    require(cfg.eval.period > 0, "eval.period", f"must be positive, got {cfg.eval.period}")
    require(cfg.train.checkpoint_period > 0, "train.checkpoint_period", "must be positive")
    require(cfg.train.checkpoint_period_iters >= 0, "train.checkpoint_period_iters", "must be >= 0 (0: epoch ends only)")
    from passreid.finetune.methods import get_method, list_methods  # the registry imports the method modules

    require(cfg.method in list_methods(), "method", f"unknown method {cfg.method!r}; one of {', '.join(list_methods())}")
    method_checks = get_method(cfg.method).validate
    if method_checks is not None:  # the method's own config section, checked only when the method runs
        method_checks(cfg)
    return cfg
