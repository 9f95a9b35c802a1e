"""Cluster Contrast in one meta-architecture: the training network and the cluster memory.

Usage inside a training loop (the loop owns clustering, data, optimizer, schedules and checkpoints)::

    meta = ClusterContrastMetaArch(model, temperature=0.05, momentum=0.2, use_hard=False).to(device)
    meta.distribute(ddp)                                            # multi-process only
    optimizer = make_optimizer(meta.param_groups(cfg.optim), cfg.optim)
    for epoch in ...:
        meta.memory.reset(centroids)                                # re-clustered pseudo labels
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = meta.forward_backward(images, labels, autocast=amp.autocast, scaler=amp.scaler)
            step(optimizer, scaler)

``meta.model`` (the :class:`~passreid.models.reid.ReIDModel`) is what a checkpoint stores, with its own keys;
the memory is saved by the trainer next to it. A DDP wrapper added with :meth:`distribute` is kept out of
the module tree.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ContextManager

import torch
from torch import Tensor, nn

from passreid.engine import check_finite_on_every_rank
from passreid.engine.optim import build_param_groups
from passreid.models.reid import ReIDModel
from passreid.usl.config import UslOptimConfig
from passreid.usl.memory import ClusterMemory
from passreid.usl.model import ClusterContrastNet

__all__ = ["ClusterContrastMetaArch"]


class ClusterContrastMetaArch(nn.Module):
    """A :class:`ClusterContrastNet` over ``model`` (BN-neck features, optional ghost batch norm) and a
    :class:`ClusterMemory` of ``model``'s feature dimension (empty until :meth:`ClusterMemory.reset`).

    Attributes: ``net``, ``memory``, ``model`` (``net.model``).
    """

    def __init__(self, model: ReIDModel, *, temperature: float, momentum: float, use_hard: bool,
                 ghost_bn_size: int = 0) -> None:
        super().__init__()
        self.net = ClusterContrastNet(model, ghost_bn_size)
        self.memory = ClusterMemory(model.head.feature_dim, 0, temperature, momentum, use_hard)
        self._wrapper: nn.Module | None = None

    @property
    def model(self) -> ReIDModel:
        """The re-ID model being trained (what checkpoints and evaluation use)."""
        return self.net.model

    @property
    def forward_module(self) -> nn.Module:
        """The module the training forward runs through: the wrapper of :meth:`distribute`, else ``net``."""
        return self._wrapper if self._wrapper is not None else self.net

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Run the training forward through ``wrap(net)`` (e.g. DDP), not registered as a submodule.
        Returns the wrapper."""
        wrapper = wrap(self.net)
        object.__setattr__(self, "_wrapper", wrapper)
        return wrapper

    def param_groups(self, optim: UslOptimConfig) -> list[dict]:
        """:func:`passreid.engine.optim.build_param_groups` over ``model`` with ``optim``'s lr, weight decays and
        bias lr factor; each group also gets ``lr_multiplier`` (its lr / ``optim.lr``) for the schedule."""
        groups = build_param_groups(self.model, optim.lr, optim.weight_decay, optim.weight_decay_bias,
                                    optim.bias_lr_factor)
        for group in groups:
            group["lr_multiplier"] = group["lr"] / optim.lr
        return groups

    def forward_backward(self, images: Tensor, targets: Tensor, *,
                         autocast: Callable[[], ContextManager[Any]] | None = None,
                         scaler: torch.amp.GradScaler | None = None, iteration: int | None = None) -> Tensor:
        """Features (under ``autocast``) -> memory loss (fp32; a collective under DDP) -> backward, which also
        updates the memory (:mod:`passreid.usl.memory`). Does not step the optimizer.

        ``targets`` are cluster ids. Raises :class:`passreid.engine.NonFiniteLossError` before backward if the
        loss is NaN/Inf (``iteration``: the 1-based step for the message). Returns this process's loss, detached.
        """
        with (autocast or contextlib.nullcontext)():
            feats = self.forward_module(images)
        loss = self.memory(feats, targets)
        check_finite_on_every_rank(loss, -1 if iteration is None else iteration)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()
