"""Learning-rate schedule of the fine-tuning recipes (TransReID: solver/cosine_lr.py and solver/lr_scheduler.py);
the optimiser over its parameter groups is :func:`passreid.engine.optim.make_optimizer`.
"""
from __future__ import annotations

from collections.abc import Sequence

from passreid.engine.schedules import warmup_cosine_lr, warmup_multistep_lr
from passreid.finetune.config import FinetuneOptimConfig

__all__ = ["epoch_learning_rates", "schedule_epoch"]


def epoch_learning_rates(cfg: FinetuneOptimConfig, epoch: int, total_epochs: int,
                         base_lrs: Sequence[float]) -> list[float]:
    """Every param group's learning rate in 0-based ``epoch`` of ``total_epochs`` (``base_lrs``: each group's
    rate as built).

    ``cfg.scheduler: cosine`` (PASS / TransReID): per-epoch linear warm-up from ``lr x warmup_lr_factor``, then
    cosine to ``lr x min_lr_factor`` (timm's ``CosineLRScheduler``; TransReID: solver/cosine_lr.py). The warm-up
    start and the minimum derive from the base ``lr`` for every group (timm semantics), so the bias group warms
    up from the same value and ends at the same minimum. ``warmup_multistep`` (BPBReID): torchreid's warm-up from
    ``lr x warmup_lr_factor`` over ``warmup_epochs``, ``x gamma`` at each of ``milestones``. The value index
    follows the recipe's stepping convention (:func:`schedule_epoch`).
    """
    index = schedule_epoch(epoch, cfg.lr_stepping)
    if cfg.scheduler == "warmup_multistep":
        return [warmup_multistep_lr(index, base, cfg.milestones, cfg.gamma, cfg.warmup_epochs, cfg.warmup_lr_factor)
                for base in base_lrs]
    if cfg.scheduler != "cosine":
        raise ValueError(f"optim.scheduler must be cosine or warmup_multistep, got {cfg.scheduler!r}")
    return [warmup_cosine_lr(index, base, total_epochs, cfg.warmup_epochs, cfg.lr * cfg.warmup_lr_factor,
                             cfg.lr * cfg.min_lr_factor) for base in base_lrs]


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
