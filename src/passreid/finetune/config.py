"""The fine-tuning config: the shared sections plus what supervised re-ID fine-tuning adds.

Defaults are the PASS ViT-S/16 recipe (PASS-reID: PASS_transreid/configs/market/vit_small.yml and
model/make_model.py, ``build_transformer_pass``): PASS head with four BN
necks and ``cat`` fusion, pre-BN test feature, CE (no label smoothing) + soft-margin batch-hard
triplet 1:1, SGD lr 4e-4 with 20 warm-up epochs and cosine to 0.002x over 120 epochs, PASS's
end-of-epoch scheduler stepping. Recipes in ``configs/finetune/`` change only what differs.

The settings of one method (``dpm:``, ``bpbreid:``, ``pass_parts:``, ``tsd:``, ``dpeformer:``) are not defined
here: each is a dataclass in its method's module, registered with the method
(``FinetuneMethod(section="dpm", section_type=DPMConfig, ...)``, :mod:`passreid.finetune.methods`).
:class:`FinetuneConfig` has one plain, typed field per registered section, so the YAML keys, the loader's
key and type checks and ``config.yaml`` are those of any other section, and every section is always present
(a recipe may set a section of a method it does not select; it is kept and saved, and checked by the method's
``validate`` only when that method runs). Importing this module checks that these fields and the registry
agree. This module imports the registry (which imports every method module); the method modules import
``FinetuneConfig`` for type annotations only, so there is no import cycle.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from passreid.config import require
from passreid.config.schema import DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig
# The registry first: importing it imports and registers every method module (in the order it chooses).
from passreid.finetune.methods import get_method, list_methods, method_sections
from passreid.finetune.bpbreid import BPBReIDConfig
from passreid.finetune.dpeformer import DPEFormerConfig
from passreid.finetune.dpm import DPMConfig
from passreid.finetune.pass_parts import PassPartsConfig
from passreid.finetune.tsd import TSDConfig
from passreid.models.cnn import is_cnn_arch

__all__ = [
    "FinetuneConfig",
    "FinetuneDataConfig",
    "FinetuneModelConfig",
    "FinetuneOptimConfig",
    "FinetuneTrainConfig",
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
    # The methods' own sections: one field per registered section (FinetuneMethod.section / section_type),
    # named and typed as registered; _check_method_sections below keeps the two lists equal.
    dpm: DPMConfig = field(default_factory=DPMConfig)
    bpbreid: BPBReIDConfig = field(default_factory=BPBReIDConfig)
    pass_parts: PassPartsConfig = field(default_factory=PassPartsConfig)
    tsd: TSDConfig = field(default_factory=TSDConfig)
    dpeformer: DPEFormerConfig = field(default_factory=DPEFormerConfig)


#: The FinetuneConfig fields every method reads; every other field is a registered method's own section.
SHARED_SECTIONS = ("method", "model", "data", "loss", "optim", "eval", "train")


def _check_method_sections() -> None:
    """FinetuneConfig's method fields are exactly the registered sections, each with the registered dataclass
    (a method added without its field, or a field left after its method went, fails at import)."""
    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    registered = method_sections()
    own = {name: f for name, f in fields.items() if name not in SHARED_SECTIONS}
    if set(own) != set(registered):
        raise TypeError(f"FinetuneConfig's method sections {sorted(own)} differ from the sections the fine-tuning "
                        f"methods register {sorted(registered)}")
    for name, section_type in registered.items():
        default = own[name].default_factory()
        if type(default) is not section_type:
            raise TypeError(f"FinetuneConfig.{name} defaults to {type(default).__name__}, but its method registers "
                            f"section_type {section_type.__name__}")


_check_method_sections()


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
    require(cfg.method in list_methods(), "method", f"unknown method {cfg.method!r}; one of {', '.join(list_methods())}")
    method = get_method(cfg.method)
    if method.section is not None and not isinstance(getattr(cfg, method.section, None), method.section_type):
        # A method registered after this module was imported (outside the package) without its field.
        raise TypeError(f"method {method.name!r} registers config section {method.section!r} "
                        f"({method.section_type.__name__}), which FinetuneConfig has no field for")
    if method.validate is not None:  # the method's own config section, checked only when the method runs
        method.validate(cfg)
    return cfg
