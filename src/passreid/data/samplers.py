"""Samplers that are deterministic per (seed, epoch), shard across ranks and resume mid-epoch.

Both samplers yield the indices of *this rank* for the epoch set with ``set_epoch``; the order is a pure
function of (seed, epoch, rank, world_size), so every rank can build it without communication.

Resuming
--------
``state_dict(consumed=None)`` returns ``{"epoch", "position"}``, where ``position`` is how many of this rank's
indices of the epoch are done. ``load_state_dict`` makes the next ``iter()`` of that same epoch start at
``position``; a later ``set_epoch`` with another epoch starts from 0 again (``set_epoch`` with the *same*
epoch keeps the loaded position, so the usual ``load_state_dict(...); set_epoch(e); for batch in loader``
works).

Which indices are "done" depends on how the DataLoader is used:

* ``num_workers=0``: the loader pulls indices only when the next batch is requested, so what the sampler has
  yielded equals what the trainer has consumed; ``state_dict()`` (no argument) is exact.
* ``num_workers>0``: the loader runs ahead by ``num_workers * prefetch_factor`` batches, so the yield count
  overshoots. Count the batches the training loop has actually finished *since this iterator started*
  and call ``state_dict(consumed=batches_done * loader_batch_size)``; the sampler adds the position the
  iteration started from (after a resume), so the count is always relative to the current iterator.

``len(sampler)`` is the full per-rank length of the current epoch (not the remainder after a resume).

Per-sample augmentation seeds
-----------------------------
:class:`SampleSeeds` wraps a sampler and yields ``(seed, index)``; :class:`SeededSamples` wraps the dataset
and draws sample ``index``'s random augmentation from ``seed``. The seed is a pure function of (base seed,
epoch, the sample's position in the epoch's *global* order), so a sample is augmented the same way by any
worker, after a mid-epoch resume, with any ``num_workers`` and on any number of processes.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset, Sampler

from passreid.seeding import derive_seed, seeded_global_rngs

# Keeps the per-sample augmentation streams apart from other streams derived from the same base seed.
_SAMPLE_SEED_PURPOSE = 2


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


class _ResumableSampler(Sampler[int]):
    """Epoch/position bookkeeping shared by the samplers; subclasses build one epoch's rank indices."""

    def __init__(self, seed: int, rank: int, world_size: int):
        _check_rank(rank, world_size)
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._pending_start = 0            # where the next iteration of `epoch` starts
        self._iter_start: int | None = None  # where the running/last iteration of `epoch` started
        self._yielded = 0                  # indices yielded by that iteration
        self._cache: tuple[int, list[int]] | None = None

    def _build_rank_indices(self, epoch: int) -> list[int]:
        raise NotImplementedError

    def _rank_indices(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._build_rank_indices(epoch))
        return self._cache[1]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a new epoch starts at position 0, the current one keeps its position."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch = epoch
            self._pending_start = 0
            self._iter_start = None

    def __len__(self) -> int:
        return len(self._rank_indices(self.epoch))

    def __iter__(self) -> Iterator[int]:
        # Book-keeping happens here, eagerly, not inside the generator body (which runs only on first next()).
        indices = self._rank_indices(self.epoch)
        start = self._pending_start
        self._pending_start = 0            # iterating again without set_epoch replays the epoch from 0
        self._iter_start = start
        self._yielded = 0
        return self._generate(indices, start)

    def _generate(self, indices: list[int], start: int) -> Iterator[int]:
        for index in indices[start:]:
            self._yielded += 1
            yield index

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """``{"epoch", "position"}`` of this rank; ``consumed``: indices finished since this iterator started.

        Without ``consumed`` the sampler assumes every index it yielded was consumed (exact for a
        ``num_workers=0`` DataLoader); with prefetching workers pass ``batches_done * batch_size``.
        """
        if self._iter_start is None:     # nothing iterated in this epoch yet (or just loaded)
            if consumed not in (None, 0):
                raise ValueError(f"state_dict(consumed={consumed}): no iteration of epoch {self.epoch} has started")
            return {"epoch": self.epoch, "position": self._pending_start}
        if consumed is None:
            consumed = self._yielded
        elif not 0 <= consumed <= self._yielded:
            raise ValueError(f"state_dict(consumed={consumed}): must be between 0 and the {self._yielded} "
                             f"indices yielded since this iterator started")
        return {"epoch": self.epoch, "position": self._iter_start + consumed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue epoch ``state["epoch"]`` at ``state["position"]`` on the next iteration."""
        missing = {"epoch", "position"} - set(state)
        if missing:
            raise KeyError(f"sampler state is missing {sorted(missing)}; expected keys 'epoch' and 'position'")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0:
            raise ValueError(f"sampler state: epoch must be >= 0, got {epoch}")
        length = len(self._rank_indices(epoch))
        if not 0 <= position <= length:
            raise ValueError(f"sampler state: position {position} outside [0, {length}] for epoch {epoch} "
                             f"(was it saved with another dataset, batch size or world size?)")
        self.epoch = epoch
        self._pending_start = position
        self._iter_start = None

    @property
    def iteration_start(self) -> int:
        """The epoch position the running (or last) iteration started from."""
        if self._iter_start is None:
            raise RuntimeError("iteration_start: no iteration of this epoch has started")
        return self._iter_start

    def global_position(self, position: int) -> int:
        """Where this rank's ``position``-th index of the epoch stands in the epoch's global order (the
        order a single process would see)."""
        raise NotImplementedError


class BatchShardedSampler(_ResumableSampler):
    """A sampler that builds the epoch's global batches (:meth:`global_batches`) and gives rank ``r`` slice
    ``r`` of each (``per_rank_batch_size`` indices), so a rank's batch keeps whole identities."""

    per_rank_batch_size: int

    def global_batches(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def _build_rank_indices(self, epoch: int) -> list[int]:
        start = self.rank * self.per_rank_batch_size
        return [index for batch in self.global_batches(epoch)
                for index in batch[start:start + self.per_rank_batch_size]]

    def global_position(self, position: int) -> int:
        batch, offset = divmod(position, self.per_rank_batch_size)
        return (batch * self.world_size + self.rank) * self.per_rank_batch_size + offset


class RandomIdentitySampler(BatchShardedSampler):
    """P x K identity sampler (PASS/TransReID behaviour), sharded across ranks and resumable.

    Per epoch, with ``rng = default_rng([seed, epoch])``: each identity's indices are up-sampled with
    replacement to K if it has fewer than K, shuffled and cut into chunks of K (a short last chunk is
    dropped); then, while at least P identities still have chunks, P of them are drawn without replacement
    and contribute one chunk each, forming one global batch of ``batch_size = P * K``.

    Distributed: every rank builds the same global batch list and takes slice ``rank`` of each batch
    (``batch_size // world_size`` indices = ``P // world_size`` whole identities), so ranks see disjoint,
    equally many positions and each rank's batch keeps identities' K images together (what batch-hard
    triplet mining needs). Use ``per_rank_batch_size`` as the DataLoader batch size.
    """

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        super().__init__(seed, rank, world_size)
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of num_instances "
                             f"({num_instances})")
        num_ids_per_batch = batch_size // num_instances
        if num_ids_per_batch % world_size:
            raise ValueError(f"identities per batch ({num_ids_per_batch} = batch_size {batch_size} / "
                             f"num_instances {num_instances}) must be divisible by world_size ({world_size}) "
                             f"so that each rank gets whole identities")
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_ids_per_batch = num_ids_per_batch
        self.per_rank_batch_size = batch_size // world_size
        self._index_by_pid = self._group_by_pid(pids)
        if len(self._index_by_pid) < num_ids_per_batch:
            raise ValueError(f"RandomIdentitySampler needs at least P={num_ids_per_batch} identities, "
                             f"got {len(self._index_by_pid)}")

    @staticmethod
    def _group_by_pid(pids: Sequence[int]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            pid = int(pid)
            if pid < 0:
                raise ValueError(f"RandomIdentitySampler: pid {pid} at index {index}; labels must be >= 0 "
                                 f"(drop unlabeled/outlier samples first)")
            groups[pid].append(index)
        return dict(sorted(groups.items()))   # sorted: the order must not depend on input order of ids

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global P x K batches (identical on every rank)."""
        rng = np.random.default_rng([self.seed, epoch])
        k = self.num_instances
        chunks: dict[int, list[list[int]]] = {}
        for pid, indices in self._index_by_pid.items():
            pool = np.asarray(indices)
            if len(pool) < k:
                pool = rng.choice(pool, size=k, replace=True)
            pool = rng.permutation(pool)
            usable = len(pool) // k * k
            chunks[pid] = [pool[start:start + k].tolist() for start in range(0, usable, k)]
        available = list(chunks)
        batches = []
        while len(available) >= self.num_ids_per_batch:
            chosen = rng.choice(len(available), size=self.num_ids_per_batch, replace=False)
            batch = []
            for position in chosen:
                batch.extend(chunks[available[position]].pop(0))
            batches.append(batch)
            available = [pid for pid in available if chunks[pid]]
        return batches


class ResumableDistributedSampler(_ResumableSampler):
    """Shuffled (or ordered) sharded sampler for unlabeled data, resumable mid-epoch.

    Per epoch the order is a permutation from ``default_rng([seed, epoch])`` (identity when
    ``shuffle=False``). ``drop_last=True`` trims it to a multiple of ``world_size``; ``drop_last=False`` pads
    by repeating from its start. Rank ``r`` takes positions ``r, r + world_size, ...`` (the same convention
    as ``torch.utils.data.DistributedSampler``), so shards are disjoint and equally long.
    """

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        super().__init__(seed, rank, world_size)
        if num_samples < 1:
            raise ValueError(f"ResumableDistributedSampler needs num_samples >= 1, got {num_samples}")
        if drop_last and num_samples < world_size:
            raise ValueError(f"num_samples ({num_samples}) < world_size ({world_size}) with drop_last=True "
                             f"leaves no samples")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.drop_last = drop_last

    def _build_rank_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        if self.drop_last:
            order = order[:len(order) // self.world_size * self.world_size]
        else:
            padded = -(-len(order) // self.world_size) * self.world_size
            order = np.resize(order, padded)   # np.resize repeats from the start
        return order[self.rank::self.world_size].tolist()

    def global_position(self, position: int) -> int:
        return position * self.world_size + self.rank


class SampleSeeds(Sampler[tuple[int, int]]):
    """Yields ``(augmentation seed, index)`` for the indices of ``sampler`` (see the module docstring).

    The DataLoader takes this as its sampler and :class:`SeededSamples` as its dataset; resume and
    ``state_dict`` stay on the wrapped sampler.
    """

    def __init__(self, sampler: _ResumableSampler, seed: int) -> None:
        self.sampler = sampler
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = iter(self.sampler)  # sets the epoch and start position eagerly
        epoch, start = self.sampler.epoch, self.sampler.iteration_start
        return ((derive_seed(_SAMPLE_SEED_PURPOSE, self.seed, epoch, self.sampler.global_position(start + offset)),
                 index) for offset, index in enumerate(indices))


class SeededSamples(Dataset):
    """``dataset[index]`` drawn with the global random generators seeded from the key's seed: item
    ``(seed, index)`` (keys come from :class:`SampleSeeds`)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        seed, index = key
        with seeded_global_rngs(seed):
            return self.dataset[index]


def _default_reader(path: str):
    from .images import read_image  # lazy: keeps LMDB support out of import time
    return read_image(path)


class ImageDataset(Dataset):
    """Items (``ImageItem`` or ``(path, pid, camid)`` tuples) -> ``dict(img, pid, camid, index)``.

    ``reader`` decodes a path (default ``passreid.data.images.read_image``: RGB, errors name the file);
    ``transform`` maps the decoded image to the model input (``None`` keeps the PIL image).
    """

    def __init__(self, items: Sequence[Any], transform: Callable | None = None,
                 reader: Callable[[str], Any] | None = None):
        for position, item in enumerate(items):
            if len(item) < 3:
                raise ValueError(f"ImageDataset item {position} is {item!r}; expected (path, pid, camid)")
        self.items = list(items)
        self.transform = transform
        self.reader = reader or _default_reader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, pid, camid = self.items[index][:3]
        image = self.reader(path)
        if self.transform is not None:
            image = self.transform(image)
        return {"img": image, "pid": int(pid), "camid": int(camid), "index": int(index)}


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of a dataset in order: disjoint shards, no padding, so an
    order-restoring gather sees every sample exactly once (shards may differ in length by one)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world size {world_size}")
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
