"""Optimiser and learning-rate schedule of the fine-tuning recipes (finetune-occluded.md §4.3).

Parameters whose name contains ``bias`` get ``lr x bias_lr_factor`` and ``weight_decay_bias``; all
others (positions, tokens and LayerNorm weights included: the recipes have no no-decay list) get
``lr`` and ``weight_decay``. Frozen parameters (the BNNeck biases) are left out. The published code
makes one group per parameter; two groups with the same hyper-parameters are equivalent.
"""
from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from passreid.engine import WarmupCosineLR
from passreid.engine.schedules import WarmupMultiStepLR
from passreid.finetune.config import FinetuneOptimConfig

__all__ = ["build_lr_scheduler", "build_optimizer", "build_param_groups", "schedule_epoch"]


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


def build_optimizer(model: nn.Module, cfg: FinetuneOptimConfig, exclude: Collection[str] = ()) -> torch.optim.Optimizer:
    """SGD (momentum ``cfg.momentum``), Adam or AdamW over :func:`build_param_groups` (minus ``exclude``)."""
    groups = build_param_groups(model, cfg.lr, cfg.weight_decay, cfg.weight_decay_bias, cfg.bias_lr_factor, exclude)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"optim.name must be sgd, adam or adamw, got {cfg.name!r}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneOptimConfig, epochs: int) -> WarmupCosineLR:
    """Per-epoch linear warm-up from ``lr x warmup_lr_factor``, then cosine to ``lr x min_lr_factor``.

    ``warmup_lr_init`` and ``lr_min`` derive from the base lr for every group (timm semantics, so the
    bias group warms up from the same value and ends at the same minimum).
    ``cfg.scheduler: warmup_multistep`` gives torchreid's warm-up multi-step schedule instead (BPBReID):
    warm-up from ``lr x warmup_lr_factor`` over ``warmup_epochs``, ``x gamma`` at each of ``milestones``.
    """
    if cfg.scheduler == "warmup_multistep":
        return WarmupMultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.gamma,
                                 warmup_epochs=cfg.warmup_epochs, warmup_factor=cfg.warmup_lr_factor)
    if cfg.scheduler != "cosine":
        raise ValueError(f"optim.scheduler must be cosine or warmup_multistep, got {cfg.scheduler!r}")
    return WarmupCosineLR(
        optimizer,
        total_epochs=epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr_init=cfg.lr * cfg.warmup_lr_factor,
        lr_min=cfg.lr * cfg.min_lr_factor,
    )


def schedule_epoch(epoch: int, stepping: str) -> int:
    """Schedule index whose learning rate epoch ``epoch`` (0-based) trains with.

    ``"pass"``: PASS steps the scheduler at the end of each epoch, so epoch ``e`` runs at value ``e``
    (the first epoch at ``warmup_lr_init``). ``"transreid"``: TransReID/DPM/TSD call ``step(e)`` at the
    start of epoch ``e = 1..E``, so 0-based epoch ``e`` runs at value ``e + 1``.
    """
    if stepping == "pass":
        return epoch
    if stepping == "transreid":
        return epoch + 1
    raise ValueError(f"lr stepping must be 'pass' or 'transreid', got {stepping!r}")
