"""Learning-rate / weight-decay / momentum schedules.

Two families, matching the two published code bases:

- :func:`cosine_schedule`: a per-iteration array (dinov2 / DINO / PASS pre-training,
  PASS-reID: PASS/utils.py ``cosine_scheduler``). The loop reads ``schedule[iteration]``, so resuming needs nothing
  but the iteration counter.
- :func:`warmup_cosine_lr` / :class:`WarmupCosineLR`: the per-epoch timm ``CosineLRScheduler``
  with ``cycle_limit=1`` used by PASS / TransReID fine-tuning (TransReID: solver/scheduler_factory.py).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def cosine_schedule(
    base: float,
    final: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup: float = 0.0,
) -> np.ndarray:
    """Per-iteration values: linear warm-up, then a half cosine from ``base`` to ``final``.

    Warm-up is ``np.linspace(start_warmup, base, warmup_iters)`` (endpoint included, so the
    first value is ``start_warmup`` and the last warm-up value is ``base``). The remaining
    ``n = total_iters - warmup_iters`` values are ``final + 0.5 (base - final)(1 + cos(pi i / n))``
    for ``i = 0..n-1``: they start at ``base`` and approach, without reaching, ``final``.
    Returns an array of length ``total_iters``.
    """
    if total_iters <= 0:
        raise ValueError(f"cosine_schedule: total_iters must be positive, got {total_iters}")
    if not 0 <= warmup_iters <= total_iters:
        raise ValueError(
            f"cosine_schedule: warmup_iters must be in [0, total_iters={total_iters}], got {warmup_iters}"
        )
    warmup = np.linspace(start_warmup, base, warmup_iters)
    steps = np.arange(total_iters - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate((warmup, cosine))


def warmup_cosine_lr(
    epoch: int,
    base_lr: float,
    total_epochs: int,
    warmup_epochs: int = 0,
    warmup_lr_init: float = 0.0,
    lr_min: float = 0.0,
) -> float:
    """Learning rate at ``epoch`` of timm's ``CosineLRScheduler`` (one cycle, ``warmup_prefix=False``).

    - ``t < warmup_epochs``: ``warmup_lr_init + t (base_lr - warmup_lr_init) / warmup_epochs``;
    - ``warmup_epochs <= t < total_epochs``: ``lr_min + 0.5 (base_lr - lr_min)(1 + cos(pi t / total_epochs))``,
      with ``t`` *not* shifted by the warm-up, so the cosine phase starts below ``base_lr``;
    - ``t >= total_epochs``: ``lr_min``.
    PASS fine-tuning: ``warmup_lr_init = 0.01 BASE_LR``, ``lr_min = 0.002 BASE_LR``, where
    ``base_lr`` may be a group's own rate (biases at 2x) while ``lr_min`` stays from BASE_LR.
    """
    if total_epochs <= 0:
        raise ValueError(f"warmup_cosine_lr: total_epochs must be positive, got {total_epochs}")
    if warmup_epochs < 0 or epoch < 0:
        raise ValueError(f"warmup_cosine_lr: epoch and warmup_epochs must be >= 0, got {epoch}, {warmup_epochs}")
    if epoch < warmup_epochs:
        return warmup_lr_init + epoch * (base_lr - warmup_lr_init) / warmup_epochs
    if epoch >= total_epochs:
        return lr_min
    return lr_min + 0.5 * (base_lr - lr_min) * (1 + math.cos(math.pi * epoch / total_epochs))


class WarmupCosineLR:
    """Per-epoch :func:`warmup_cosine_lr` applied to every param group of an optimizer.

    Each group's ``base_lr`` is its ``lr`` when the scheduler is created (kept in
    ``initial_lr``, as torch schedulers do). Like timm, construction sets the epoch-0 rate.
    Call ``step(epoch)`` with the epoch index whose rate to set: TransReID calls it at the
    start of epochs 1..E, PASS at the end of epoch e (so epoch 1 runs at ``warmup_lr_init``);
    the stage picks its convention (TransReID: train.py; PASS-reID: PASS_transreid/processor/processor.py).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_epochs: int,
        warmup_epochs: int = 0,
        warmup_lr_init: float = 0.0,
        lr_min: float = 0.0,
    ) -> None:
        self.optimizer = optimizer
        self.total_epochs = total_epochs
        self.warmup_epochs = warmup_epochs
        self.warmup_lr_init = warmup_lr_init
        self.lr_min = lr_min
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = 0
        self.step(0)

    def lrs_at(self, epoch: int) -> list[float]:
        """The rate of every param group at ``epoch`` (nothing is changed)."""
        return [
            warmup_cosine_lr(epoch, base, self.total_epochs, self.warmup_epochs, self.warmup_lr_init, self.lr_min)
            for base in self.base_lrs
        ]

    def step(self, epoch: int) -> None:
        """Set every group's ``lr`` to its value at ``epoch``."""
        for group, lr in zip(self.optimizer.param_groups, self.lrs_at(epoch)):
            group["lr"] = lr
        self.last_epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(
                f"WarmupCosineLR: state has {len(state['base_lrs'])} param groups, "
                f"the optimizer has {len(self.optimizer.param_groups)}"
            )
        self.base_lrs = list(state["base_lrs"])
        self.step(state["last_epoch"])


def apply_schedule(
    optimizer: torch.optim.Optimizer,
    lr: float | None = None,
    weight_decay: float | None = None,
) -> None:
    """Write this iteration's scheduled values into the param groups, dinov2-style.

    Each group gets ``lr * group.get("lr_multiplier", 1)`` and
    ``weight_decay * group.get("wd_multiplier", 1)`` (``wd_multiplier=0`` for biases/norms,
    layer-wise decay through ``lr_multiplier``). ``None`` leaves that hyper-parameter alone.
    """
    for group in optimizer.param_groups:
        if lr is not None:
            group["lr"] = float(lr) * group.get("lr_multiplier", 1.0)
        if weight_decay is not None:
            group["weight_decay"] = float(weight_decay) * group.get("wd_multiplier", 1.0)


def warmup_multistep_lr(
    epoch: int,
    base_lr: float,
    milestones: list[int] | tuple[int, ...],
    gamma: float = 0.1,
    warmup_epochs: int = 0,
    warmup_factor: float = 0.01,
) -> float:
    """Learning rate at ``epoch`` of torchreid's ``WarmupMultiStepLR`` (linear warm-up; bpbreid: torchreid/optim/lr_scheduler.py).

    ``base_lr * f(epoch) * gamma ** (number of milestones <= epoch)`` with
    ``f = warmup_factor + (1 - warmup_factor) * epoch / warmup_epochs`` during the warm-up, else 1.
    BPBReID: warm-up 10 epochs from 0.01x, x0.1 at epochs 40 and 70.
    """
    if epoch < 0 or warmup_epochs < 0:
        raise ValueError(f"warmup_multistep_lr: epoch and warmup_epochs must be >= 0, got {epoch}, {warmup_epochs}")
    if list(milestones) != sorted(milestones):
        raise ValueError(f"warmup_multistep_lr: milestones must be increasing, got {list(milestones)}")
    factor = 1.0
    if epoch < warmup_epochs:
        factor = warmup_factor + (1.0 - warmup_factor) * epoch / warmup_epochs
    decays = sum(1 for milestone in milestones if milestone <= epoch)
    return base_lr * factor * gamma**decays


class WarmupMultiStepLR(WarmupCosineLR):
    """Per-epoch :func:`warmup_multistep_lr` for every param group; same interface as :class:`WarmupCosineLR`
    (``step(epoch)`` sets the rate of ``epoch``, state dicts, ``lrs_at``)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: list[int] | tuple[int, ...],
        gamma: float = 0.1,
        warmup_epochs: int = 0,
        warmup_factor: float = 0.01,
    ) -> None:
        self.milestones = list(milestones)
        self.gamma = gamma
        self.warmup_factor = warmup_factor
        super().__init__(optimizer, total_epochs=max(self.milestones + [1]), warmup_epochs=warmup_epochs)

    def lrs_at(self, epoch: int) -> list[float]:
        return [warmup_multistep_lr(epoch, base, self.milestones, self.gamma, self.warmup_epochs, self.warmup_factor)
                for base in self.base_lrs]


def save_schedules(path: str | os.PathLike[str], **arrays: np.ndarray) -> Path:
    """Write a run's per-iteration schedules (``lr=``, ``weight_decay=``, ...; row ``i`` is iteration ``i + 1``)
    to an ``.npz`` file, atomically (temporary file, then rename). ``numpy.load`` reads them back."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        np.savez(handle, **{name: np.asarray(values) for name, values in arrays.items()})
    os.replace(temporary, path)
    return path
