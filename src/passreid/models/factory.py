"""Building re-ID networks from the shared model section (:class:`passreid.config.ReIDModelConfig`): the ViT,
its starting weights (``model.pretrained``) and the BNNeck re-ID model (:class:`passreid.models.reid.ReIDModel`).
Fine-tuning methods and Cluster Contrast build their networks from these.
"""
from __future__ import annotations

import logging

from torch import nn

from passreid.config import RANDOM_INIT, ReIDModelConfig, require
from passreid.models.checkpoint import LoadReport, load_pretrained
from passreid.models.reid import ReIDModel
from passreid.models.vit import VisionTransformer, build_vit

__all__ = ["build_backbone", "build_reid_model", "load_backbone_weights"]

logger = logging.getLogger(__name__)


def build_backbone(model: ReIDModelConfig) -> VisionTransformer:
    """The ViT of ``model`` (random init; fine-tuning adds positions unchanged when grids match)."""
    return build_vit(
        model.arch,
        img_size=tuple(model.img_size),
        patch_size=model.patch_size,
        stride_size=model.stride_size,
        drop_path_rate=model.drop_path_rate,
        num_part_tokens=model.num_part_tokens,
    )


def load_backbone_weights(backbone: nn.Module, model: ReIDModelConfig) -> LoadReport | None:
    """Load ``model.pretrained`` into ``backbone`` (never partially unless the recipe allows it).

    Accepts every layout of :func:`passreid.models.load_pretrained`: a pretrain/ ``backbone.pth``
    export, a PASS/DINO training checkpoint (teacher by default), a converted backbone, timm ViT
    weights. Position embeddings are resized to this model's token grid and reported. For a CNN
    backbone (:mod:`passreid.models.cnn`): its ImageNet state dict, whose classification head and
    missing BatchNorm counters are accepted and listed in the logged report; any other difference
    is an error naming the keys.
    An empty ``model.pretrained`` is a :class:`ConfigError`: a recipe of a published row never starts from
    random weights silently. ``model.pretrained=none`` asks for random initialisation (one warning).
    """
    require(bool(model.pretrained), "model.pretrained",
            f"is empty, so the {model.arch} backbone would start from random weights; set "
            f"model.pretrained=<checkpoint file> (the recipe header names the published weights), or "
            f"model.pretrained={RANDOM_INIT} to train from random initialisation on purpose")
    if model.pretrained == RANDOM_INIT:
        logger.warning("backbone: %s from RANDOM initialisation (model.pretrained=%s); published numbers assume "
                       "pre-trained weights", model.arch, RANDOM_INIT)
        return None
    report = load_pretrained(
        backbone,
        model.pretrained,
        # CNN backbones (passreid.models.cnn) accept their ImageNet file's classifier and BN counters, reported
        allow_missing=tuple(model.pretrained_allow_missing) + getattr(backbone, "optional_weight_keys", ()),
        allow_unexpected=tuple(model.pretrained_allow_unexpected) + getattr(backbone, "imagenet_head_keys", ()),
        hw_ratio=model.hw_ratio,
        which=model.pretrained_which,
    )
    if report.missing or report.unexpected or report.shape_mismatched:
        logger.warning("backbone weights loaded with allowed differences:\n%s", report.summary())
    return report


def build_reid_model(model: ReIDModelConfig, num_classes: int, num_cameras: int, load_weights: bool = True) -> ReIDModel:
    """ViT + BNNeck head (PASS or [CLS]) of ``model``, SIE when ``model.sie_camera``, JPM when ``model.jpm``;
    ``model.pretrained`` loaded into the backbone when ``load_weights``."""
    if model.sie_camera and num_cameras < 1:
        raise ValueError("model.sie_camera is set but the training set has no camera ids")
    backbone = build_backbone(model)
    if load_weights:
        load_backbone_weights(backbone, model)
    return ReIDModel(
        backbone,
        num_classes,
        head=model.head,
        feat_fusion=model.feat_fusion,
        multi_neck=model.multi_neck,
        normalize_necks=model.normalize_necks,
        neck_feat=model.neck_feat,
        num_cameras=num_cameras if model.sie_camera else 0,
        sie_coe=model.sie_coe,
        jpm=model.jpm,
        jpm_num_branches=model.jpm_num_branches,
        jpm_shift=model.jpm_shift,
        jpm_shuffle_groups=model.jpm_shuffle_groups,
        jpm_rearrange=model.jpm_rearrange,
    )
