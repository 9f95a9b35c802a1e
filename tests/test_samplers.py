"""P x K identity sampler, resumable distributed sampler and ImageDataset."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from passreid.data.samplers import ImageDataset, RandomIdentitySampler, ResumableDistributedSampler

# 10 identities with 1..7 images each (several below K=4), in shuffled order like a real train list.
COUNTS = [1, 2, 3, 4, 5, 6, 7, 4, 2, 9]
PIDS = np.random.default_rng(0).permutation(np.repeat(np.arange(len(COUNTS)), COUNTS)).tolist()
K = 4


def _batches(indices: list[int], size: int) -> list[list[int]]:
    assert len(indices) % size == 0
    return [indices[i:i + size] for i in range(0, len(indices), size)]


# ---------------------------------------------------------------------------------------------- P x K


@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_every_batch_is_p_identities_times_k_images(epoch):
    sampler = RandomIdentitySampler(PIDS, batch_size=12, num_instances=K, seed=3)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    assert len(indices) == len(sampler)
    for batch in _batches(indices, 12):
        groups = _batches(batch, K)
        pids = [{PIDS[i] for i in group} for group in groups]
        assert all(len(p) == 1 for p in pids), "each K-chunk must be one identity"
        assert len({p.pop() for p in pids}) == 3, "P distinct identities per batch"
    # Chunks: an id with n >= K images gives floor(n / K) chunks of distinct images; one with n < K gives
    # one chunk up-sampled (with replacement) from its own images.
    chunks_used = Counter()
    for group in _batches(indices, K):
        pid = PIDS[group[0]]
        chunks_used[pid] += 1
        if COUNTS[pid] >= K:
            assert len(set(group)) == K
    available = {pid: max(n, K) // K for pid, n in enumerate(COUNTS)}
    assert all(chunks_used[pid] <= available[pid] for pid in available)
    # Images of an id with n >= K never repeat across its chunks within an epoch.
    for pid, n in enumerate(COUNTS):
        if n >= K:
            used = [i for i in indices if PIDS[i] == pid]
            assert len(used) == len(set(used))
    # Stopping rule: sampling ends only when fewer than P identities still have chunks.
    left = sum(1 for pid in available if chunks_used[pid] < available[pid])
    assert left < 3


def test_up_sampling_of_small_identities_happens():
    sampler = RandomIdentitySampler(PIDS, batch_size=8, num_instances=K, seed=0)
    seen_small = Counter()
    for epoch in range(10):
        sampler.set_epoch(epoch)
        for group in _batches(list(sampler), K):
            if COUNTS[PIDS[group[0]]] < K:
                seen_small[PIDS[group[0]]] += 1
                assert len(group) == K
    assert seen_small[0] > 0, "the single-image identity must appear (as K copies of its image)"


def test_epoch_determinism():
    def run(seed, epoch):
        sampler = RandomIdentitySampler(PIDS, batch_size=8, num_instances=K, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert run(0, 2) == run(0, 2)
    assert run(0, 2) != run(0, 3)
    assert run(0, 2) != run(1, 2)
    sampler = RandomIdentitySampler(PIDS, batch_size=8, num_instances=K)
    assert list(sampler) == list(sampler), "iterating twice without set_epoch replays the epoch"


def test_distributed_shards_are_disjoint_slices_of_the_same_batches():
    world_size, batch_size = 2, 16
    reference = RandomIdentitySampler(PIDS, batch_size=batch_size, num_instances=K, seed=7)
    reference.set_epoch(4)
    global_batches = reference.global_batches(4)
    shards = []
    for rank in range(world_size):
        sampler = RandomIdentitySampler(PIDS, batch_size=batch_size, num_instances=K, seed=7, rank=rank,
                                        world_size=world_size)
        sampler.set_epoch(4)
        assert sampler.per_rank_batch_size == 8
        shards.append(_batches(list(sampler), 8))
    assert len(shards[0]) == len(shards[1]) == len(global_batches)
    for batch, part0, part1 in zip(global_batches, *shards):
        assert part0 + part1 == batch                       # disjoint positions, together the global batch
        for part in (part0, part1):                         # whole identities on each rank
            assert all(len({PIDS[i] for i in group}) == 1 for group in _batches(part, K))
        assert not {PIDS[i] for i in part0} & {PIDS[i] for i in part1}


def test_identity_sampler_argument_errors():
    with pytest.raises(ValueError, match="multiple of num_instances"):
        RandomIdentitySampler(PIDS, batch_size=10, num_instances=4)
    with pytest.raises(ValueError, match="divisible by world_size"):
        RandomIdentitySampler(PIDS, batch_size=12, num_instances=4, world_size=2)
    with pytest.raises(ValueError, match="pid -1 at index 1"):
        RandomIdentitySampler([0, -1, 1], batch_size=4, num_instances=2)
    with pytest.raises(ValueError, match="at least P=4 identities"):
        RandomIdentitySampler([0, 0, 1, 1], batch_size=8, num_instances=2)
    with pytest.raises(ValueError, match="rank"):
        RandomIdentitySampler(PIDS, batch_size=8, num_instances=4, rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------- resume


def _make_samplers():
    return [
        lambda: RandomIdentitySampler(PIDS, batch_size=16, num_instances=K, seed=1, rank=1, world_size=2),
        lambda: ResumableDistributedSampler(37, seed=1, rank=1, world_size=3),
    ]


@pytest.mark.parametrize("make", _make_samplers())
def test_resume_mid_epoch_yields_exactly_the_rest(make):
    sampler = make()
    sampler.set_epoch(2)
    full = list(sampler)
    iterator = iter(sampler)
    for _ in range(5):
        next(iterator)
    state = sampler.state_dict()
    assert state == {"epoch": 2, "position": 5}

    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)                       # same epoch: keeps the loaded position
    assert resumed.state_dict() == state
    rest = list(resumed)
    assert rest == full[5:]
    assert resumed.state_dict() == {"epoch": 2, "position": len(full)}
    # Resuming a resumed run: positions stay absolute within the epoch.
    again = make()
    again.load_state_dict(state)
    iterator = iter(again)
    for _ in range(3):
        next(iterator)
    assert again.state_dict() == {"epoch": 2, "position": 8}
    assert again.state_dict(consumed=1) == {"epoch": 2, "position": 6}
    # The next epoch starts from the beginning again.
    resumed.set_epoch(3)
    fresh = make()
    fresh.set_epoch(3)
    assert resumed.state_dict()["position"] == 0 and list(resumed) == list(fresh)


class _IndexDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 10**6

    def __getitem__(self, index):
        return index


def _loader(sampler, num_workers):
    extra = {"prefetch_factor": 2, "multiprocessing_context": "fork"} if num_workers else {}
    return DataLoader(_IndexDataset(), batch_size=sampler.per_rank_batch_size, sampler=sampler,
                      num_workers=num_workers, **extra)


def test_resume_through_a_dataloader_with_and_without_prefetch():
    def make():
        return RandomIdentitySampler(PIDS, batch_size=8, num_instances=K, seed=5)

    reference = [b.tolist() for b in _loader(make(), 0)]
    assert len(reference) >= 4

    # num_workers=0: the sampler's own count is exact.
    sampler = make()
    loader_iter = iter(_loader(sampler, 0))
    consumed = [next(loader_iter).tolist() for _ in range(2)]
    state = sampler.state_dict()
    assert state["position"] == 2 * 8
    resumed = make()
    resumed.load_state_dict(state)
    assert consumed + [b.tolist() for b in _loader(resumed, 0)] == reference

    # num_workers>0: the loader prefetches, so pass what the loop actually consumed.
    sampler = make()
    loader_iter = iter(_loader(sampler, 1))
    consumed = [next(loader_iter).tolist() for _ in range(2)]
    assert sampler.state_dict()["position"] > 2 * 8, "prefetching should have pulled more indices"
    state = sampler.state_dict(consumed=2 * 8)
    del loader_iter
    resumed = make()
    resumed.load_state_dict(state)
    assert consumed + [b.tolist() for b in _loader(resumed, 0)] == reference


def test_state_errors():
    sampler = ResumableDistributedSampler(10)
    with pytest.raises(KeyError, match="position"):
        sampler.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="outside"):
        sampler.load_state_dict({"epoch": 0, "position": 11})
    with pytest.raises(ValueError, match="no iteration"):
        sampler.state_dict(consumed=3)
    iterator = iter(sampler)
    next(iterator)
    with pytest.raises(ValueError, match="between 0 and the 1"):
        sampler.state_dict(consumed=2)


# ---------------------------------------------------------------------------------------------- unlabeled


@pytest.mark.parametrize("drop_last", [True, False])
def test_distributed_sampler_shards(drop_last):
    num_samples, world_size = 23, 4
    shards = []
    for rank in range(world_size):
        sampler = ResumableDistributedSampler(num_samples, seed=2, rank=rank, world_size=world_size,
                                              drop_last=drop_last)
        sampler.set_epoch(1)
        shards.append(list(sampler))
    lengths = {len(s) for s in shards}
    assert lengths == {5 if drop_last else 6}
    together = [i for s in shards for i in s]
    if drop_last:
        assert len(set(together)) == 20
    else:
        assert set(together) == set(range(num_samples)) and len(together) == 24
    # Interleaving the shards gives back one permutation (the torch DistributedSampler convention).
    order = np.random.default_rng([2, 1]).permutation(num_samples)
    expected = order[:20] if drop_last else np.resize(order, 24)
    interleaved = [shards[pos % world_size][pos // world_size] for pos in range(len(expected))]
    assert interleaved == expected.tolist()


def test_distributed_sampler_order_and_determinism():
    ordered = ResumableDistributedSampler(9, shuffle=False, rank=1, world_size=3)
    assert list(ordered) == [1, 4, 7]
    a, b = ResumableDistributedSampler(50, seed=4), ResumableDistributedSampler(50, seed=4)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(2)
    assert list(a) != list(b)


# ---------------------------------------------------------------------------------------------- dataset


def test_image_dataset_reads_items(tmp_path):
    path = tmp_path / "0001_c1s1_000001_01.jpg"
    Image.new("RGB", (8, 16), (255, 0, 0)).save(path)
    try:
        from passreid.data.datasets import ImageItem
        items = [ImageItem(str(path), 3, 1)]
    except ImportError:          # the readers module is owned elsewhere; a plain tuple is equivalent
        items = [(str(path), 3, 1)]
    dataset = ImageDataset(items, transform=lambda image: np.asarray(image).shape)
    sample = dataset[0]
    assert sample == {"img": (16, 8, 3), "pid": 3, "camid": 1, "index": 0}
    assert len(dataset) == 1
    calls = []
    custom = ImageDataset([(str(path), 0, 0)], reader=lambda p: calls.append(p) or "decoded")
    assert custom[0]["img"] == "decoded" and calls == [str(path)]
    with pytest.raises(ValueError, match="item 0"):
        ImageDataset([(str(path),)])
