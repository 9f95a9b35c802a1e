"""The Cluster-Contrast network: the fine-tuning ReIDModel without a classifier, its training feature, and
the UDA start from a source-trained model.

The model is :class:`passreid.finetune.ReIDModel` (PASS head, ``normalize_necks`` on, ``neck_feat``
``after``), so its eval forward is the published Cluster-Contrast feature (cluster-contrast.md §5) and a
``model_final.pth`` written with the fine-tuning format loads in ``finetune/test.py``. During training it
has no classifier (the cluster memory plays that role); the final file stores the last memory as the
classifier of the final clusters.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from passreid.finetune.checkpoints import FINAL_FORMAT, map_published_state_dict
from passreid.finetune.config import FinetuneConfig
from passreid.finetune.methods import build_model
from passreid.finetune.model import ReIDModel
from passreid.models import CheckpointFormatError, LoadReport, load_pretrained, read_checkpoint

__all__ = ["ClusterContrastNet", "SourceLoad", "build_usl_model", "load_source_backbone"]

logger = logging.getLogger(__name__)


@dataclass
class SourceLoad:
    """How a UDA source model was read: the backbone load report and the source weights left behind."""

    source: str
    backbone: LoadReport
    dropped: list[str] = field(default_factory=list)  # source keys not loaded (BN necks, classifier, ...)
    source_classes: int | None = None

    def summary(self) -> str:
        classes = f" ({self.source_classes} source classes)" if self.source_classes is not None else ""
        return (f"UDA source model {self.source}: backbone {len(self.backbone.loaded)}/"
                f"{self.backbone.num_model_tensors} tensors loaded; source heads dropped{classes}: "
                f"{', '.join(self.dropped) or 'none'}")


def _source_state(obj: Any, label: str, depth: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A source file's weights in passreid ReIDModel names, and what it says about its backbone grid."""
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{label}: expected a checkpoint dict, got {type(obj).__name__}")
    meta = obj.get("meta")
    if isinstance(meta, Mapping) and meta.get("format") == FINAL_FORMAT:
        grid = {key: meta[key] for key in ("arch", "img_size", "patch_size", "stride_size", "num_part_tokens")}
        return dict(obj["model"]), grid
    if isinstance(obj.get("model"), Mapping) and "iteration" in obj and "config" in obj:
        model_cfg = obj["config"].get("model", {}) if isinstance(obj["config"], Mapping) else {}
        grid = {key: model_cfg[key] for key in ("arch", "img_size", "patch_size", "stride_size", "num_part_tokens")
                if key in model_cfg}
        return dict(obj["model"]), grid
    state = obj.get("model", obj.get("state_dict", obj))
    if not isinstance(state, Mapping) or not any(str(k).startswith(("base.", "module.base.")) for k in state):
        raise CheckpointFormatError(
            f"{label} is neither a passreid fine-tuned model (model_final.pth / checkpoint.pth) nor a published "
            "TransReID/PASS supervised checkpoint (keys 'base.*'); model.init_from expects the source-domain model"
        )
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    mapped, dropped, unknown = map_published_state_dict(state, depth, jpm=any(k.startswith("b2.") for k in state))
    if unknown:
        logger.warning("%s: keys without a mapping rule, not loaded: %s", label, ", ".join(unknown))
    return mapped, {}


def load_source_backbone(backbone: nn.Module, path: str, hw_ratio: int = 2) -> SourceLoad:
    """Load the backbone of a source-domain model into ``backbone`` (strictly: every backbone tensor).

    ``path``: a passreid fine-tuning ``model_final.pth`` or ``checkpoint.pth``, or a published TransReID /
    PASS supervised checkpoint. Everything outside the backbone (BN necks, classifier, SIE, JPM branches)
    is dropped and listed, as the published UDA loader skips every neck and classifier key
    (cluster-contrast.md §4). Position embeddings of another grid are resized and reported.
    """
    state, grid = _source_state(read_checkpoint(path), path, depth=len(backbone.blocks))
    backbone_state = {key[len("backbone."):]: value for key, value in state.items() if key.startswith("backbone.")}
    if not backbone_state:
        raise CheckpointFormatError(f"{path}: no backbone weights ('backbone.*') in the source model")
    dropped = sorted(key for key in state if not key.startswith("backbone."))
    export = {"backbone": backbone_state, **{k: v for k, v in grid.items() if k != "arch"}}
    report = load_pretrained(backbone, export, hw_ratio=hw_ratio, label=path)
    classifier = state.get("head.classifier.weight")
    result = SourceLoad(path, report, dropped, int(classifier.shape[0]) if classifier is not None else None)
    logger.info("%s", result.summary())
    return result


def build_usl_model(ft_cfg: FinetuneConfig, init_from: str = "",
                    load_weights: bool = True) -> tuple[ReIDModel, SourceLoad | None]:
    """The Cluster-Contrast model of ``ft_cfg`` (see :func:`passreid.usl.to_finetune_config`), without a
    classifier, started from ``init_from`` (UDA) or ``ft_cfg.model.pretrained`` (USL) when ``load_weights``."""
    model = build_model(ft_cfg, 1, 0, load_weights=load_weights and not init_from)
    if not isinstance(model, ReIDModel):
        raise TypeError(f"Cluster Contrast needs the bnneck ReIDModel, got {type(model).__name__}")
    model.head.classifier = None  # the cluster memory is the classifier while training
    source = None
    if load_weights and init_from:
        source = load_source_backbone(model.backbone, init_from, hw_ratio=ft_cfg.model.hw_ratio)
    return model, source


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
