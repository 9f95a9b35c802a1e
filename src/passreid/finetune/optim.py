"""Optimiser and learning-rate schedule of the fine-tuning recipes (TransReID: solver/make_optimizer.py,
solver/cosine_lr.py and solver/lr_scheduler.py), over :func:`passreid.engine.optim.build_param_groups`.
"""
from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from passreid.engine import WarmupCosineLR
from passreid.engine.optim import build_param_groups
from passreid.engine.schedules import WarmupMultiStepLR
from passreid.finetune.config import FinetuneOptimConfig

__all__ = ["build_lr_scheduler", "build_optimizer", "schedule_epoch"]


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
