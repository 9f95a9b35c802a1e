"""Cluster memory of Cluster Contrast (PASS-reID: PASS_cluster_contrast_reid/clustercontrast/models/cm.py).

The memory ``M`` (K x D) holds one L2-normalised prototype per pseudo-label cluster, rebuilt from the
cluster centroids every epoch (:meth:`ClusterMemory.reset`). For a batch of features ``f`` with pseudo
labels ``y``::

    q = normalize(f);  logits = q Mᵀ / temperature;  loss = CE(logits, y)   (mean over the batch)

The product ``q Mᵀ`` is a custom autograd function: its backward returns ``grad_q = grad_logits · M``
with the memory *before* the update, and then updates the memory in place (the update happens inside
``loss.backward()``, before ``optimizer.step()``), with the detached, train-mode batch features:

* default (``use_hard=False``): every sample in batch order, ``M_y <- m M_y + (1 - m) q``, then
  ``M_y <- M_y / ||M_y||`` — a cluster with k samples in the batch gets k successive updates;
* hard (``use_hard=True``): per cluster in the batch, only the sample with the *lowest* cosine similarity
  to ``M_y`` (the first one on ties) updates it, once.

Distributed: the per-process batches are gathered (rank order = the global batch order of
:class:`~passreid.usl.sampler.PseudoLabelSampler`) in the forward, so every process applies the same
update over the whole global batch and the memories stay identical — the single-process update on the
global batch, as with the published ``nn.DataParallel``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from passreid import dist

__all__ = ["ClusterMemory", "hard_momentum_update", "momentum_update"]


@torch.no_grad()
def momentum_update(memory: Tensor, feats: Tensor, targets: Tensor, momentum: float) -> None:
    """Sequential per-sample update of ``memory`` in place (see the module docstring).

    Updates of different rows commute, so the samples are processed in rounds: round r updates every
    cluster with its r-th sample of the batch, all clusters at once. Equal to the per-sample loop.
    """
    if targets.numel() == 0:
        return
    order = torch.argsort(targets, stable=True)  # batch order within each cluster
    sorted_targets = targets[order]
    first = torch.ones_like(sorted_targets, dtype=torch.bool)
    first[1:] = sorted_targets[1:] != sorted_targets[:-1]
    group_start = torch.cummax(torch.where(first, torch.arange(len(order), device=order.device), 0), 0).values
    occurrence = torch.empty_like(order)
    occurrence[order] = torch.arange(len(order), device=order.device) - group_start
    for round_index in range(int(occurrence.max()) + 1):
        chosen = occurrence == round_index
        rows = targets[chosen]
        updated = memory[rows] * momentum + feats[chosen].to(memory.dtype) * (1.0 - momentum)
        memory[rows] = F.normalize(updated, dim=1)


@torch.no_grad()
def hard_momentum_update(memory: Tensor, feats: Tensor, targets: Tensor, momentum: float) -> None:
    """One update per cluster of the batch with its least similar sample (see the module docstring)."""
    if targets.numel() == 0:
        return
    feats = feats.to(memory.dtype)
    similarity = (feats * memory[targets]).sum(dim=1)
    # Sort by (cluster, similarity, batch position): the first entry of each cluster is its hardest sample.
    position = torch.arange(len(targets), device=targets.device)
    order = torch.argsort(position, stable=True)
    order = order[torch.argsort(similarity[order], stable=True)]
    order = order[torch.argsort(targets[order], stable=True)]
    sorted_targets = targets[order]
    first = torch.ones_like(sorted_targets, dtype=torch.bool)
    first[1:] = sorted_targets[1:] != sorted_targets[:-1]
    hardest = order[first]
    rows = targets[hardest]
    memory[rows] = F.normalize(memory[rows] * momentum + feats[hardest] * (1.0 - momentum), dim=1)


class _MemoryProduct(torch.autograd.Function):
    """``q Mᵀ`` whose backward uses the old memory for the gradient, then updates the memory."""

    @staticmethod
    def forward(ctx, inputs: Tensor, memory: Tensor, update_feats: Tensor, update_targets: Tensor,
                momentum: float, use_hard: bool) -> Tensor:
        ctx.memory = memory
        ctx.update = (update_feats, update_targets, momentum, use_hard)
        return inputs.mm(memory.t())

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        memory = ctx.memory
        grad_inputs = grad_output.mm(memory) if ctx.needs_input_grad[0] else None
        update_feats, update_targets, momentum, use_hard = ctx.update
        update = hard_momentum_update if use_hard else momentum_update
        update(memory, update_feats, update_targets, momentum)
        return grad_inputs, None, None, None, None, None


class ClusterMemory(nn.Module):
    """Cluster prototypes with the Cluster-Contrast loss; see the module docstring.

    ``features`` is a buffer (K x D), part of the state dict; :meth:`reset` replaces it (and K) with
    new normalised centroids every epoch.
    """

    def __init__(self, num_features: int, num_clusters: int = 0, temperature: float = 0.05,
                 momentum: float = 0.2, use_hard: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_features = num_features
        self.temperature = temperature
        self.momentum = momentum
        self.use_hard = use_hard
        self.register_buffer("features", torch.zeros(num_clusters, num_features))

    @property
    def num_clusters(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def reset(self, centroids: Tensor) -> None:
        """Replace the memory by the L2-normalised ``centroids`` (K x D), on the memory's device."""
        if centroids.ndim != 2 or centroids.shape[1] != self.num_features or centroids.shape[0] < 1:
            raise ValueError(f"centroids must be (K >= 1, {self.num_features}), got {tuple(centroids.shape)}")
        self.features = F.normalize(centroids.float(), dim=1).to(self.features.device)

    def forward(self, feats: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of ``normalize(feats) Mᵀ / temperature`` against ``targets`` (cluster ids).

        Under DDP every process calls it with its own batch (a collective)."""
        if self.num_clusters == 0:
            raise RuntimeError("the cluster memory is empty: call reset(centroids) first")
        if feats.ndim != 2 or feats.shape[1] != self.num_features or targets.shape != feats.shape[:1]:
            raise ValueError(f"expected feats (B, {self.num_features}) and targets (B,), got "
                             f"{tuple(feats.shape)} and {tuple(targets.shape)}")
        targets = targets.long()
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.num_clusters):
            raise ValueError(f"targets must be cluster ids in 0..{self.num_clusters - 1}, got "
                             f"{int(targets.min())}..{int(targets.max())}")
        with torch.autocast(device_type=feats.device.type, enabled=False):
            inputs = F.normalize(feats.float(), dim=1)
            update_feats, update_targets = self._global_batch(inputs.detach(), targets)
            logits = _MemoryProduct.apply(inputs, self.features, update_feats, update_targets, self.momentum,
                                          self.use_hard)
            return F.cross_entropy(logits / self.temperature, targets)

    @staticmethod
    def _global_batch(feats: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Every process's (features, targets) concatenated in rank order (this process's alone without DDP)."""
        world_size = dist.get_world_size()
        if world_size == 1:
            return feats, targets
        # Per-rank batches may differ in size (the last batch of a pass): gather the sizes first.
        size = torch.tensor([feats.shape[0]], device=feats.device)
        sizes = [torch.zeros_like(size) for _ in range(world_size)]
        torch.distributed.all_gather(sizes, size)
        largest = int(max(s.item() for s in sizes))
        padded = torch.zeros(largest, feats.shape[1] + 1, device=feats.device, dtype=feats.dtype)
        padded[:feats.shape[0], :-1] = feats
        padded[:feats.shape[0], -1] = targets.to(feats.dtype)
        parts = [torch.zeros_like(padded) for _ in range(world_size)]
        torch.distributed.all_gather(parts, padded)
        rows = torch.cat([part[:int(n.item())] for part, n in zip(parts, sizes)])
        return rows[:, :-1].contiguous(), rows[:, -1].round().long()
