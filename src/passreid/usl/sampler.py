"""P x K batches over pseudo labels with camera-diverse positives (the published RandomMultipleGallerySampler).

PASS-reID: PASS_cluster_contrast_reid/clustercontrast/utils/data/sampler.py. One *pass* visits every pseudo identity once, in random order; for each identity:

1. a random anchor image is emitted;
2. the identity's images from *other cameras* than the anchor's are candidates; if there are any, K − 1 of
   them are drawn, without replacement when there are at least K candidates, with replacement otherwise;
3. otherwise the identity's other images are the candidates, under the same rule;
4. an identity with a single image emits only its anchor (shifting the P x K grouping, as published).

A pass shorter than one batch (fewer than ``batch_size / K`` clusters) is chained with the next pass
(a batch then spans two passes); the published loader would never yield a batch there.

The published loader cuts each pass into batches of ``batch_size`` (``drop_last``) and restarts the pass when
it runs out (``IterLoader``); an epoch is exactly ``iters`` batches, starting with a fresh pass. Here the
batches of an epoch are a pure function of ``(seed, epoch)`` (``numpy.random.default_rng([seed, epoch])``),
so every rank builds the same list and resumes mid-epoch with the sampler state (``{"epoch", "position"}``).
Under DDP rank ``r`` takes the ``r``-th contiguous slice of each global batch, so concatenating the ranks'
batches in rank order gives the global batch (what the cluster memory update relies on).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from passreid.data.samplers import BatchShardedSampler

__all__ = ["PseudoLabelSampler"]

logger = logging.getLogger(__name__)


class PseudoLabelSampler(BatchShardedSampler):
    """Indices of this rank for ``iters`` global batches of ``batch_size`` per epoch (module docstring)."""

    def __init__(self, labels: Sequence[int], camids: Sequence[int], batch_size: int, num_instances: int,
                 iters: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(seed, rank, world_size)
        labels, camids = np.asarray(labels, dtype=np.int64), np.asarray(camids, dtype=np.int64)
        if labels.shape != camids.shape or labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"need equally long non-empty label and camera lists, got {labels.shape}, {camids.shape}")
        if int(labels.min()) < 0:
            raise ValueError("pseudo labels must be >= 0: drop the outliers (-1) before sampling")
        if num_instances < 1 or batch_size < 1 or iters < 1:
            raise ValueError(f"batch_size ({batch_size}), num_instances ({num_instances}) and iters ({iters}) "
                             "must be positive")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the world size {world_size}")
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.iters = iters
        self.per_rank_batch_size = batch_size // world_size
        self.camids = camids
        groups: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels.tolist()):
            groups[label].append(index)
        self.members = [np.asarray(groups[label]) for label in sorted(groups)]
        self.pass_length = sum(1 if len(m) == 1 else num_instances for m in self.members)
        # A pass shorter than a batch would give the published loader no batch at all (it would spin
        # forever); such passes are chained instead, a batch then spanning two passes.
        self.chain_passes = self.pass_length < batch_size
        if self.chain_passes and rank == 0:
            logger.warning("one pass over the %d pseudo identities yields %d images, fewer than a batch of %d: "
                           "batches span consecutive passes", len(self.members), self.pass_length, batch_size)

    def one_pass(self, rng: np.random.Generator) -> list[int]:
        """One pass over every pseudo identity (module docstring)."""
        out: list[int] = []
        k = self.num_instances
        for group in rng.permutation(len(self.members)):
            members = self.members[group]
            anchor = int(members[rng.integers(len(members))])
            out.append(anchor)
            candidates = members[self.camids[members] != self.camids[anchor]]
            if candidates.size == 0:
                candidates = members[members != anchor]
            if candidates.size == 0:
                continue
            out.extend(rng.choice(candidates, size=k - 1, replace=candidates.size < k).tolist())
        return out

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's ``iters`` global batches (identical on every rank)."""
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[list[int]] = []
        carry: list[int] = []
        while len(batches) < self.iters:
            stream = carry + self.one_pass(rng)
            usable = len(stream) // self.batch_size * self.batch_size
            batches.extend(stream[start:start + self.batch_size] for start in range(0, usable, self.batch_size))
            carry = stream[usable:] if self.chain_passes else []  # published: drop_last within each pass
        return batches[:self.iters]
