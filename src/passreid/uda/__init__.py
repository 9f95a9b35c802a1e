"""Domain-adaptive re-ID (UDA): Cluster Contrast on the unlabeled target domain, started from a model
fine-tuned on the labelled source domain.

UDA is the USL stage (:mod:`passreid.usl`) with one difference: the network starts from
``model.init_from``, a source-domain ``finetune/`` model (its backbone is kept; its BN necks and classifier
are dropped and reported, as the published UDA loader does), instead of a pre-trained backbone. No source
image is read during adaptation. The published recipes also switch on the multi-neck feature, which
``configs/uda/`` sets.
"""
from __future__ import annotations

from passreid.config import ConfigError
from passreid.usl import UslConfig, UslResult, run_usl

__all__ = ["run_uda"]


def run_uda(cfg: UslConfig, resume: bool = True) -> UslResult:
    """Adapt the source model ``cfg.model.init_from`` to the target data set of ``cfg`` (or resume)."""
    if not cfg.model.init_from:
        raise ConfigError("config key 'model.init_from': UDA starts from a model trained on the source domain; "
                          "pass model.init_from=<finetune run>/model_final.pth (usl/train.py is the pure USL stage)")
    return run_usl(cfg, resume=resume)
