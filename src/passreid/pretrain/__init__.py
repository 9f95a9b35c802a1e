"""PASS part-aware self-supervised pre-training: heads, loss and the student/teacher meta-architecture.

The multi-crop augmentation lives in :mod:`passreid.data.multicrop`; the training loop and entry
point use :class:`PASSMetaArch` (see its module docstring for the loop shape).
"""
from passreid.pretrain.heads import DINOHead, PASSHead, WeightNormLinear, build_projection_mlp
from passreid.pretrain.loss import MultiCropOutputs, PASSLoss, teacher_temperature_schedule
from passreid.pretrain.meta_arch import (
    PRETRAIN_MODES,
    MultiCropNetwork,
    PASSMetaArch,
    from_published_layout,
    to_published_layout,
)

__all__ = [
    "DINOHead",
    "MultiCropNetwork",
    "MultiCropOutputs",
    "PASSHead",
    "PASSLoss",
    "PASSMetaArch",
    "PRETRAIN_MODES",
    "WeightNormLinear",
    "build_projection_mlp",
    "from_published_layout",
    "teacher_temperature_schedule",
    "to_published_layout",
]
