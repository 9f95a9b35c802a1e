"""The global batch on every process: per-sample tensors gathered with their gradients, synchronised BatchNorm.

Under DDP each process sees only its shard of the batch, so a loss that looks across the batch (batch-hard
triplet mining) or a layer that normalises over it (BatchNorm) computes something else than on one process.
These helpers let N processes compute the 1-process result on the same global batch:

* :func:`gather_batch` replaces every per-sample tensor of a model output by the concatenation of all ranks'
  tensors (rank order, which is the global batch order of a batch-sharded sampler);
* :func:`convert_sync_batchnorm` makes every BatchNorm layer normalise with the statistics of the global batch
  (:class:`torch.nn.SyncBatchNorm` on GPUs, :class:`PortableSyncBatchNorm` on CPU, where torch has no kernels).

Gradient convention (the one of :class:`torch.nn.SyncBatchNorm`): the backward of these collectives gives each
rank the gradient of the *sum of every rank's loss* with respect to its own samples. When every rank computes
the same loss ``L`` from the gathered batch, the sum is ``N · L``; DDP averages the parameter gradients over the
``N`` ranks, so the step uses exactly ``dL/dθ``, the 1-process gradient. No loss rescaling is needed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .comm import get_world_size

__all__ = ["PortableSyncBatchNorm", "all_gather_with_grad", "convert_sync_batchnorm", "gather_batch"]

T = TypeVar("T")


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order; the gradient reaches each rank's own rows.

    Shapes must agree across ranks. Backward: the gradients every rank holds for the gathered tensor are summed
    (an all-reduce) and each rank keeps its own rows (the convention of the module docstring). One process:
    ``tensor`` itself. (torch's ``torch.distributed.nn.functional.all_gather`` does the same but is deprecated.)
    """
    if get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.rows, ctx.rank = tensor.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        summed = grad.contiguous().clone()  # all_reduce works in place; autograd may still use grad elsewhere
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_batch(batch: T, batch_size: int) -> T:
    """``batch`` with every tensor replaced by the global batch (:func:`all_gather_with_grad`).

    Walks dataclasses, dicts, lists and tuples; other leaves (numbers, strings, ``None``, modules) are kept as
    they are. Every tensor must be per-sample, i.e. have ``batch_size`` rows: a batch-level value (a scalar
    loss term, a class-by-feature matrix) cannot be made global by concatenation, so it raises a ValueError
    naming where it sits (checked on one process too). Every rank must pass the same structure.
    """
    return _gather_node(batch, batch_size, "output")


def _gather_node(node: Any, batch_size: int, where: str) -> Any:
    if isinstance(node, Tensor):
        if node.ndim == 0 or node.shape[0] != batch_size:
            raise ValueError(f"{where} has shape {tuple(node.shape)}: only per-sample tensors ({batch_size} rows) "
                             f"can be gathered into the global batch; compute batch-level terms from them after "
                             f"the gather")
        return all_gather_with_grad(node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return dataclasses.replace(node, **{field.name: _gather_node(getattr(node, field.name), batch_size,
                                                                     f"{where}.{field.name}")
                                            for field in dataclasses.fields(node) if field.init})
    if isinstance(node, dict):
        return {key: _gather_node(value, batch_size, f"{where}[{key!r}]") for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        gathered = [_gather_node(value, batch_size, f"{where}[{i}]") for i, value in enumerate(node)]
        return gathered if isinstance(node, list) else tuple(gathered)
    return node


class PortableSyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch, built from differentiable collectives: runs on CPU (gloo) too.

    torch's :class:`~torch.nn.SyncBatchNorm` has GPU kernels only (on CPU its forward raises and DDP refuses
    it). This layer gathers every rank's per-channel (mean, sum of squared deviations, count) with
    :func:`all_gather_with_grad` and combines them (Chan's parallel variance: no
    cancellation), so it normalises with the mean and biased variance of the global batch and updates the
    running estimates with its unbiased variance, as BatchNorm on one process does. Gradients follow the module
    docstring's convention. In eval mode and for one process it is plain BatchNorm. Accepts ``(N, C, *)`` input.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if self.training and get_world_size() > 1:
            return self._synced_forward(input)
        return super().forward(input)

    def _synced_forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        channels = input.shape[1]
        reduce_dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        values = input.float()
        local_mean = values.mean(reduce_dims)
        local_m2 = (values - local_mean.view(shape)).pow(2).sum(reduce_dims)
        count = torch.full((1,), float(input.numel() // channels), dtype=values.dtype, device=values.device)
        stats = all_gather_with_grad(torch.cat([local_mean, local_m2, count]).unsqueeze(0))  # (world, 2C + 1)
        means, m2s, counts = stats[:, :channels], stats[:, channels:2 * channels], stats[:, 2 * channels:]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        m2 = (m2s + counts * (means - mean).pow(2)).sum(0)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), m2.detach() / (total - 1).clamp(min=1))
        output = (values - mean.view(shape)) * torch.rsqrt(m2 / total + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output.to(input.dtype)

    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        """torch's rule: ``running <- (1 - m) running + m batch`` (``momentum=None``: the cumulative average)."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)

    @classmethod
    def from_batchnorm(cls, layer: _BatchNorm) -> "PortableSyncBatchNorm":
        """A layer holding ``layer``'s own parameter and buffer tensors (optimizers and state dicts unaffected)."""
        synced = cls(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
        if layer.affine:
            synced.weight, synced.bias = layer.weight, layer.bias
        if layer.track_running_stats:
            synced.running_mean, synced.running_var = layer.running_mean, layer.running_var
            synced.num_batches_tracked = layer.num_batches_tracked
        synced.train(layer.training)
        return synced


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm layer normalising over the global batch of the default process group.

    On CUDA: :class:`torch.nn.SyncBatchNorm` (torch's GPU kernels); elsewhere (CPU / gloo):
    :class:`PortableSyncBatchNorm`. The layers keep their parameter and buffer tensors, so an optimizer built
    before keeps working and state dicts keep their keys.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _replace_batchnorm(module)


def _replace_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, (PortableSyncBatchNorm, nn.SyncBatchNorm)):
        return PortableSyncBatchNorm.from_batchnorm(module)
    for name, child in module.named_children():
        module.add_module(name, _replace_batchnorm(child))
    return module
