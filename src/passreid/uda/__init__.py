"""Domain-adaptive re-ID (UDA): Cluster Contrast on the unlabeled target domain, started from a model
fine-tuned on the labelled source domain.

UDA is the USL stage (:mod:`passreid.usl`) with one difference, :class:`UdaTrainer`'s model: the network
starts from ``model.init_from``, a source-domain ``finetune/`` model (its backbone is kept; its BN necks and
classifier are dropped and reported, as the published UDA loader does: :mod:`passreid.uda.source`), instead
of a pre-trained backbone. No source image is read during adaptation. The published recipes also switch on
the multi-neck feature, which ``configs/uda/`` sets.
"""
from __future__ import annotations

from typing import Any

from passreid.config import ConfigError
from passreid.models.reid import ReIDModel
from passreid.uda.source import SourceLoad, build_uda_model, load_source_backbone
from passreid.usl import ClusterContrastTrainer, UslConfig, UslResult
from passreid.usl.config import validate_usl_config
from passreid.usl.trainer import run_cluster_contrast

__all__ = ["SourceLoad", "UdaTrainer", "build_uda_model", "load_source_backbone", "run_uda", "validate_uda_config"]


class UdaTrainer(ClusterContrastTrainer):
    """The USL trainer whose network starts from the source model ``model.init_from``."""

    stage_label = "UDA"

    def _build_model(self, load_weights: bool) -> tuple[ReIDModel, Any]:
        return build_uda_model(self.cfg.model, self.cfg.model.init_from, load_weights=load_weights)


def validate_uda_config(cfg: UslConfig) -> UslConfig:
    """The Cluster-Contrast checks plus UDA's start: ``model.init_from`` must name the source-trained model."""
    if not cfg.model.init_from:
        raise ConfigError("config key 'model.init_from': UDA starts from a model trained on the source domain; "
                          "pass model.init_from=<finetune run>/model_final.pth (usl/train.py is the pure USL stage)")
    return validate_usl_config(cfg)


def run_uda(cfg: UslConfig, resume: bool = True) -> UslResult:
    """Adapt the source model ``cfg.model.init_from`` to the target data set of ``cfg`` (or resume)."""
    return run_cluster_contrast(UdaTrainer, validate_uda_config(cfg), resume)
