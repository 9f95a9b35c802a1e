"""The Cluster-Contrast network: the re-ID model without a classifier and its training feature (the UDA start
from a source-trained model is :mod:`passreid.uda.source`).

The model is :class:`passreid.models.reid.ReIDModel` (PASS head, ``normalize_necks`` on, ``neck_feat``
``after``), so its eval forward is the published Cluster-Contrast feature (PASS-reID:
PASS_cluster_contrast_reid/clustercontrast/models/vision_transformer.py) and its ``model_final.pth``
(:mod:`passreid.models.reid_file`) loads in ``finetune/test.py`` like a fine-tuned ``bnneck`` model. During
training it has no classifier (the cluster memory plays that role); the final file stores the last memory as
the classifier of the final clusters.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from passreid.config import ReIDModelConfig
from passreid.models.factory import build_reid_model
from passreid.models.reid import ReIDModel

__all__ = ["ClusterContrastNet", "build_usl_model"]

logger = logging.getLogger(__name__)


def build_usl_model(model_cfg: ReIDModelConfig, load_weights: bool = True) -> ReIDModel:
    """The Cluster-Contrast model of ``model_cfg`` without a classifier, with ``model_cfg.pretrained`` loaded
    when ``load_weights``."""
    model = build_reid_model(model_cfg, 1, 0, load_weights=load_weights)
    model.head.classifier = None  # the cluster memory is the classifier while training
    return model


@contextlib.contextmanager
def _running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``module`` normalise with batch statistics but leave their running statistics as
    they are (momentum 0: running = 1 x running + 0 x batch)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


class ClusterContrastNet(nn.Module):
    """The training forward of a :class:`ReIDModel`: its BN-neck output ``(B, feature_dim)`` (the feature
    the cluster memory compares), with optional ghost batch norm (``ghost_bn_size``, see
    ``train.ghost_bn_size``). This is the module DDP wraps."""

    def __init__(self, model: ReIDModel, ghost_bn_size: int = 0) -> None:
        super().__init__()
        if model.jpm is not None or model.sie_embed is not None:
            raise ValueError("Cluster Contrast uses the global branch without SIE: build the model without JPM/SIE")
        self.model = model
        self.ghost_bn_size = ghost_bn_size

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.model.backbone(images)
        head = self.model.head
        if self.ghost_bn_size <= 0 or tokens.shape[0] <= self.ghost_bn_size:
            return head(tokens).after
        chunks = tokens.split(self.ghost_bn_size)
        # nn.DataParallel kept the running statistics of its first replica only.
        outputs = [head(chunks[0]).after]
        with _running_stats_frozen(head):
            outputs += [head(chunk).after for chunk in chunks[1:]]
        return torch.cat(outputs)
