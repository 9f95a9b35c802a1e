"""PASS part-aware self-supervised pre-training: heads, loss, the student/teacher meta-architecture,
the config and the training stage.

As a library::

    cfg = load_config(PretrainConfig, "configs/pretrain/demo.yaml", ["train.output_dir=runs/pt"])
    result = run_pretraining(cfg)      # result.backbone: the teacher export other stages load

The multi-crop augmentation lives in :mod:`passreid.data.multicrop`.
"""
from passreid.pretrain.config import PretrainConfig, validate_pretrain_config
from passreid.pretrain.heads import DINOHead, PASSHead, WeightNormLinear, build_projection_mlp
from passreid.pretrain.loss import MultiCropOutputs, PASSLoss, teacher_temperature_schedule
from passreid.pretrain.meta_arch import (
    PRETRAIN_MODES,
    MultiCropNetwork,
    PASSMetaArch,
    from_published_layout,
    to_published_layout,
)
from passreid.pretrain.trainer import BACKBONE_FILE, BACKBONE_FINAL_FILE, PretrainResult, run_pretraining

__all__ = [
    "BACKBONE_FILE",
    "BACKBONE_FINAL_FILE",
    "DINOHead",
    "MultiCropNetwork",
    "MultiCropOutputs",
    "PASSHead",
    "PASSLoss",
    "PASSMetaArch",
    "PRETRAIN_MODES",
    "PretrainConfig",
    "PretrainResult",
    "WeightNormLinear",
    "build_projection_mlp",
    "from_published_layout",
    "run_pretraining",
    "teacher_temperature_schedule",
    "to_published_layout",
    "validate_pretrain_config",
]
