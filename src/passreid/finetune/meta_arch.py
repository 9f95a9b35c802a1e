"""Supervised re-ID in one meta-architecture: the method's model, its criterion and its optional second pass.

Usage inside a training loop (the loop owns data, optimizer, schedules and checkpoints)::

    meta = ReIDMetaArch.from_config(cfg, num_classes, num_cameras, load_weights=True, device=device)
    meta.distribute(ddp, global_batch=True, device=device)          # multi-process only
    optimizer = make_optimizer(meta.param_groups(cfg.optim), cfg.optim)
    for batch in loader:
        batch = ReIDBatch.from_loader(batch, device)
        optimizer.zero_grad(set_to_none=True)
        terms = meta.forward_backward(batch, autocast=amp.autocast, scaler=amp.scaler)
        step(optimizer, scaler)                                      # scaler.step + update, or optimizer.step
        if meta.second_pass is not None:                             # e.g. DPM's mask generator
            meta.second_pass_step(batch, autocast=amp.autocast, scaler=amp.scaler)

The method (``cfg.method``, :mod:`passreid.finetune.methods`) is the plug-in: it builds the model, the
criterion, the second pass and the test distance. The meta-architecture only puts them in order. The model
stays a plain attribute (``meta.model``, its own state-dict keys), and a DDP wrapper added with
:meth:`ReIDMetaArch.distribute` is kept out of the module tree, so checkpoints hold the model's keys as before.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager

import torch
from torch import Tensor, nn

from passreid import dist
from passreid.engine import check_finite_on_every_rank
from passreid.engine.optim import build_param_groups
from passreid.finetune.methods import SecondPass, build_criterion, build_model, get_method

if TYPE_CHECKING:
    from passreid.finetune.config import FinetuneConfig, FinetuneOptimConfig

__all__ = ["ReIDBatch", "ReIDMetaArch", "STANDARD_BATCH_KEYS"]

# Every other field of a training batch (e.g. ``masks``) is passed to the model's forward by name.
STANDARD_BATCH_KEYS = frozenset({"img", "pid", "camid", "index"})


@dataclass
class ReIDBatch:
    """One training batch on the training device: images, identity labels, camera ids, extra model inputs."""

    images: Tensor
    pids: Tensor
    camids: Tensor
    extras: dict[str, Any]

    @classmethod
    def from_loader(cls, batch: Mapping[str, Any], device: torch.device) -> ReIDBatch:
        """A loader batch (``img``, ``pid``, ``camid``, ``index`` and extra fields) moved to ``device``."""
        missing = [key for key in ("img", "pid", "camid") if key not in batch]
        if missing:
            raise KeyError(f"a training batch needs the fields img, pid and camid; missing {missing}")
        return cls(
            batch["img"].to(device, non_blocking=True),
            torch.as_tensor(batch["pid"]).to(device, non_blocking=True),
            torch.as_tensor(batch["camid"]).to(device, non_blocking=True),
            {key: value.to(device, non_blocking=True) for key, value in batch.items()
             if key not in STANDARD_BATCH_KEYS},
        )


class ReIDMetaArch(nn.Module):
    """The model and criterion of a fine-tuning method, with its second pass when it has one.

    Args:
        model: the method's model (training forward -> :class:`~passreid.losses.reid.ReIDTrainOutput`).
        criterion: the method's loss (``criterion(output, pids)`` -> terms with ``loss``).
        second_pass: parameters of ``model`` stepped by their own optimizer after the main step, or ``None``.

    Attributes: ``model``, ``criterion``, ``second_pass``, ``second_pass_params`` (sorted by name),
    ``global_batch`` (set by :meth:`distribute`).
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, second_pass: SecondPass | None = None) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.second_pass = second_pass
        named = dict(model.named_parameters())
        unknown = sorted(set(second_pass.names) - set(named)) if second_pass is not None else []
        if unknown:
            raise ValueError(f"second-pass parameters not in the model: {unknown}")
        self.second_pass_params = [named[name] for name in sorted(second_pass.names)] if second_pass else []
        self.global_batch = False
        self._wrapper: nn.Module | None = None

    @classmethod
    def from_config(cls, cfg: FinetuneConfig, num_classes: int, num_cameras: int, *, load_weights: bool,
                    device: torch.device) -> ReIDMetaArch:
        """The model (on ``device``), criterion and second pass of ``cfg.method``, built in that order."""
        model = build_model(cfg, num_classes, num_cameras, load_weights=load_weights).to(device)
        criterion = build_criterion(cfg).to(device)
        builder = get_method(cfg.method).build_second_pass
        return cls(model, criterion, builder(model, cfg) if builder is not None else None)

    # ------------------------------------------------------------------ structure
    def distribute(self, wrap: Callable[[nn.Module], nn.Module], *, global_batch: bool,
                   device: torch.device) -> nn.Module:
        """Multi-process training: with ``global_batch`` the BatchNorm layers are synchronised and the criterion
        gets every process's outputs; the main forward then runs through ``wrap(model)`` (e.g. DDP), which is
        not registered as a submodule. Returns the wrapper."""
        if global_batch:
            self.model = dist.convert_sync_batchnorm(self.model, device)
        self.global_batch = global_batch
        wrapper = wrap(self.model)
        object.__setattr__(self, "_wrapper", wrapper)
        return wrapper

    def param_groups(self, optim: FinetuneOptimConfig) -> list[dict]:
        """The main optimizer's groups (:func:`passreid.engine.optim.build_param_groups` with ``optim``'s lr,
        weight decays and bias lr factor), the second-pass parameters left out."""
        exclude: Collection[str] = self.second_pass.names if self.second_pass is not None else ()
        return build_param_groups(self.model, optim.lr, optim.weight_decay, optim.weight_decay_bias,
                                  optim.bias_lr_factor, exclude)

    # ------------------------------------------------------------------ training
    def loss_terms(self, model: nn.Module, batch: ReIDBatch,
                   autocast: Callable[[], ContextManager[Any]] | None = None) -> dict[str, Tensor]:
        """Forward of ``model`` and the criterion; with :attr:`global_batch` the criterion gets every rank's
        outputs and labels, so every rank computes the 1-process loss of the global batch (the gathers'
        backward and DDP's averaging make the step use its gradient, see :mod:`passreid.dist.batch`)."""
        with (autocast or contextlib.nullcontext)():
            output = model(batch.images, camids=batch.camids, **batch.extras)
            pids = batch.pids
            if self.global_batch:
                output, pids = dist.gather_batch((output, pids), batch.images.shape[0])
            return self.criterion(output, pids)

    def forward_backward(self, batch: ReIDBatch, *, autocast: Callable[[], ContextManager[Any]] | None = None,
                         scaler: torch.amp.GradScaler | None = None, iteration: int | None = None) -> dict[str, Tensor]:
        """Forward (through the DDP wrapper when distributed), criterion, backward (of ``scaler.scale(loss)``
        under fp16). Does not zero the gradients nor step the optimizer.

        Raises :class:`passreid.engine.NonFiniteLossError` before backward if the loss is NaN/Inf
        (``iteration``: the 1-based step for the message). Returns the criterion's terms (``loss`` included), detached.
        """
        terms = self.loss_terms(self._wrapper if self._wrapper is not None else self.model, batch, autocast)
        loss = terms["loss"]
        check_finite_on_every_rank(loss, -1 if iteration is None else iteration,
                                   extra={k: v for k, v in terms.items() if k != "loss"})
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return {key: value.detach() for key, value in terms.items()}

    def second_pass_step(self, batch: ReIDBatch, *, autocast: Callable[[], ContextManager[Any]] | None = None,
                         scaler: torch.amp.GradScaler | None = None, iteration: int | None = None) -> float:
        """Recompute forward and loss with the updated weights and step only the second-pass parameters.

        Gradients come from ``torch.autograd.grad`` w.r.t. those parameters only (nothing else is
        back-propagated or touched), through the unwrapped model; with N > 1 processes they are averaged by
        hand. Steps through ``scaler`` (step + update) when given. Returns the loss.
        """
        if self.second_pass is None:
            raise RuntimeError("this method has no second pass")
        optimizer = self.second_pass.optimizer
        terms = self.loss_terms(self.model, batch, autocast)
        loss = terms["loss"]
        check_finite_on_every_rank(loss, -1 if iteration is None else iteration,
                                   extra={f"second_pass_{k}": v for k, v in terms.items() if k != "loss"})
        scaled = scaler.scale(loss) if scaler is not None else loss
        grads = torch.autograd.grad(scaled, self.second_pass_params, allow_unused=True)
        distributed = dist.get_world_size() > 1
        for param, grad in zip(self.second_pass_params, grads):
            param.grad = None if grad is None else (dist.all_reduce_mean(grad) if distributed else grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
