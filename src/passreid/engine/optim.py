"""Parameter groups and the optimiser shared by the supervised and Cluster-Contrast stages.

Parameters whose name contains ``bias`` get ``lr x bias_lr_factor`` and ``weight_decay_bias``; all
others (positions, tokens and LayerNorm weights included: the TransReID-family recipes have no no-decay
list, TransReID: solver/make_optimizer.py) get ``lr`` and ``weight_decay``. Frozen parameters (the BNNeck
biases) are left out. The published code makes one group per parameter; two groups with the same
hyper-parameters are equivalent.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import nn

__all__ = ["build_param_groups", "make_optimizer"]


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    weight_decay_bias: float,
    bias_lr_factor: float = 2.0,
    exclude: Collection[str] = (),
) -> list[dict]:
    """``[{"name": "default", ...}, {"name": "bias", ...}]`` over the trainable parameters (empty groups dropped).

    ``exclude`` names parameters left to another optimizer (e.g. DPM's mask generator, stepped in a second pass).
    """
    unknown = set(exclude) - {name for name, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"cannot exclude unknown parameters from the optimizer: {sorted(unknown)}")
    default, bias = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or name in exclude:
            continue
        (bias if "bias" in name else default).append(param)
    groups = [
        {"name": "default", "params": default, "lr": lr, "weight_decay": weight_decay},
        {"name": "bias", "params": bias, "lr": lr * bias_lr_factor, "weight_decay": weight_decay_bias},
    ]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def make_optimizer(groups: list[dict], cfg: Any) -> torch.optim.Optimizer:
    """SGD (momentum ``cfg.momentum``), Adam or AdamW (``cfg.name``) over ready parameter ``groups`` (e.g. a
    meta-architecture's ``param_groups``), default lr ``cfg.lr``; ``cfg`` is a stage's ``optim`` section."""
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"optim.name must be sgd, adam or adamw, got {cfg.name!r}")
