"""The one thing UDA adds to USL: the network starts from a model fine-tuned on the source domain.

:func:`load_source_backbone` reads a passreid fine-tuned model (``model_final.pth`` / ``checkpoint.pth``) or a
published TransReID / PASS supervised checkpoint, keeps its backbone and drops (and lists) everything else,
as the published loader skips every key of a neck or classifier (PASS-reID:
PASS_cluster_contrast_reid/clustercontrast/models/vision_transformer.py, ``load_param``).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from passreid.config import ReIDModelConfig
from passreid.models import CheckpointFormatError, LoadReport, load_pretrained, read_checkpoint
from passreid.models.checkpoint import group_keys
from passreid.models.published import rename_published_keys, strip_module_prefix, transreid_head_rules
from passreid.models.reid import ReIDModel
from passreid.models.reid_file import FINAL_FORMAT, pretraining_file_kind
from passreid.usl.model import build_usl_model

__all__ = ["SourceLoad", "build_uda_model", "load_source_backbone"]

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
                f"{group_keys(self.dropped) or 'none'}")


def _source_state(obj: Any, label: str, depth: int) -> tuple[dict[str, Tensor], dict[str, Any], list[str]]:
    """A source file's weights in passreid ReIDModel names, what it says about its backbone grid, and the keys
    of a released checkpoint that the renaming drops (with their reasons, e.g. the ViT's ImageNet ``base.fc``)."""
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{label}: expected a checkpoint dict, got {type(obj).__name__}")
    if pretraining_file_kind(obj) is not None:
        raise CheckpointFormatError(
            f"{label} is a pre-training file (no source-domain training): model.init_from expects the model "
            "fine-tuned on the source domain (finetune/train.py's model_final.pth, or a published TransReID/PASS "
            "supervised checkpoint); a pre-trained backbone starts USL instead (usl/train.py model.pretrained=...)")
    meta = obj.get("meta")
    if isinstance(meta, Mapping) and meta.get("format") == FINAL_FORMAT:
        grid = {key: meta[key] for key in ("arch", "img_size", "patch_size", "stride_size", "num_part_tokens")}
        return dict(obj["model"]), grid, []
    if isinstance(obj.get("model"), Mapping) and "iteration" in obj and "config" in obj:
        model_cfg = obj["config"].get("model", {}) if isinstance(obj["config"], Mapping) else {}
        grid = {key: model_cfg[key] for key in ("arch", "img_size", "patch_size", "stride_size", "num_part_tokens")
                if key in model_cfg}
        return dict(obj["model"]), grid, []
    state = obj.get("model", obj.get("state_dict", obj))
    if not isinstance(state, Mapping) or not any(str(k).startswith(("base.", "module.base.")) for k in state):
        raise CheckpointFormatError(
            f"{label} is neither a passreid fine-tuned model (model_final.pth / checkpoint.pth) nor a published "
            "TransReID/PASS supervised checkpoint (keys 'base.*'); model.init_from expects the source-domain model"
        )
    state = strip_module_prefix(state)
    jpm = any(k.startswith("b2.") for k in state)
    mapped, dropped, unknown = rename_published_keys(state, transreid_head_rules(depth, jpm), depth)
    if unknown:
        logger.warning("%s: keys without a mapping rule, not loaded: %s", label, ", ".join(unknown))
    return mapped, {}, dropped


def load_source_backbone(backbone: nn.Module, path: str, hw_ratio: int = 2) -> SourceLoad:
    """Load the backbone of a source-domain model into ``backbone`` (strictly: every backbone tensor).

    ``path``: a passreid fine-tuning ``model_final.pth`` or ``checkpoint.pth``, or a published TransReID /
    PASS supervised checkpoint. Everything outside the backbone (BN necks, classifier, SIE, JPM branches)
    is dropped and listed, as the published UDA loader skips every neck and classifier key
    (module docstring). Position embeddings of another grid are resized and reported.
    """
    state, grid, renaming_dropped = _source_state(read_checkpoint(path), path, depth=len(backbone.blocks))
    backbone_state = {key[len("backbone."):]: value for key, value in state.items() if key.startswith("backbone.")}
    if not backbone_state:
        raise CheckpointFormatError(f"{path}: no backbone weights ('backbone.*') in the source model")
    dropped = sorted(key for key in state if not key.startswith("backbone.")) + renaming_dropped
    export = {"backbone": backbone_state, **{k: v for k, v in grid.items() if k != "arch"}}
    report = load_pretrained(backbone, export, hw_ratio=hw_ratio, label=path)
    classifier = state.get("head.classifier.weight")
    result = SourceLoad(path, report, dropped, int(classifier.shape[0]) if classifier is not None else None)
    logger.info("%s", result.summary())
    return result


def build_uda_model(model_cfg: ReIDModelConfig, init_from: str, load_weights: bool = True
                    ) -> tuple[ReIDModel, SourceLoad | None]:
    """The Cluster-Contrast model of ``model_cfg`` started from the source model ``init_from`` (read only when
    ``load_weights``: a resumed run takes every weight from its checkpoint)."""
    model = build_usl_model(model_cfg, load_weights=False)
    if not load_weights:
        return model, None
    return model, load_source_backbone(model.backbone, init_from, hw_ratio=model_cfg.hw_ratio)
