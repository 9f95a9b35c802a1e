"""Cluster memory (PASS-reID: PASS_cluster_contrast_reid/clustercontrast/models/cm.py) against brute-force loops: update rules, update order, gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from passreid.usl import ClusterMemory, hard_momentum_update, momentum_update


def _brute_force_update(memory: torch.Tensor, feats: torch.Tensor, targets: torch.Tensor, m: float) -> torch.Tensor:
    """The published CM backward: one sample at a time, in batch order."""
    memory = memory.clone()
    for x, y in zip(feats, targets.tolist()):
        memory[y] = m * memory[y] + (1 - m) * x
        memory[y] = memory[y] / memory[y].norm()
    return memory


def _brute_force_hard_update(memory: torch.Tensor, feats: torch.Tensor, targets: torch.Tensor,
                             m: float) -> torch.Tensor:
    """The published CM_Hard backward: per cluster, the sample least similar to the old centre (first on ties)."""
    memory = memory.clone()
    groups: dict[int, list[torch.Tensor]] = {}
    for x, y in zip(feats, targets.tolist()):
        groups.setdefault(y, []).append(x)
    for y, members in groups.items():
        similarities = [float(x @ memory[y]) for x in members]
        hardest = members[min(range(len(members)), key=lambda i: similarities[i])]
        memory[y] = m * memory[y] + (1 - m) * hardest
        memory[y] = memory[y] / memory[y].norm()
    return memory


def _batch(seed: int, num_clusters: int = 7, batch: int = 40, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    memory = F.normalize(torch.randn(num_clusters, dim, generator=gen, dtype=torch.float64), dim=1)
    feats = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    targets = torch.randint(0, num_clusters - 1, (batch,), generator=gen)  # the last cluster never appears
    return memory, feats, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("momentum", [0.0, 0.2, 0.9])
def test_momentum_update_equals_the_sequential_loop(seed, momentum):
    memory, feats, targets = _batch(seed)
    expected = _brute_force_update(memory, feats, targets, momentum)
    momentum_update(memory, feats, targets, momentum)
    torch.testing.assert_close(memory, expected, rtol=0, atol=1e-12)


def test_momentum_update_applies_one_update_per_sample():
    # Three samples of cluster 0 in a row: the old centre keeps weight m^3 before renormalisation.
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    feats = torch.tensor([[0.0, 1.0]] * 3, dtype=torch.float64)
    momentum_update(memory, feats, torch.zeros(3, dtype=torch.long), 0.5)
    manual = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for _ in range(3):
        manual = F.normalize(0.5 * manual + 0.5 * torch.tensor([0.0, 1.0], dtype=torch.float64), dim=0)
    torch.testing.assert_close(memory[0], manual)
    torch.testing.assert_close(memory[1], torch.tensor([0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_update_equals_the_brute_force_version(seed):
    memory, feats, targets = _batch(seed)
    expected = _brute_force_hard_update(memory, feats, targets, 0.2)
    hard_momentum_update(memory, feats, targets, 0.2)
    torch.testing.assert_close(memory, expected, rtol=0, atol=1e-12)


def test_hard_update_picks_the_least_similar_sample_and_the_first_on_ties():
    memory = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    close, far = [0.96, 0.28], [0.0, 1.0]
    feats = torch.tensor([close, far, far, close], dtype=torch.float64)
    hard_momentum_update(memory, feats, torch.zeros(4, dtype=torch.long), 0.2)
    expected = F.normalize(torch.tensor([0.2 * 1.0, 0.8 * 1.0], dtype=torch.float64), dim=0)
    torch.testing.assert_close(memory[0], expected)


@pytest.mark.parametrize("use_hard", [False, True])
def test_loss_gradient_uses_the_memory_before_its_update(use_hard):
    memory, _, targets = _batch(3, dim=8)
    raw = torch.randn(len(targets), 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    module = ClusterMemory(8, temperature=0.05, momentum=0.2, use_hard=use_hard)
    module.features = memory.clone().float()
    old = module.features.clone()

    inputs = raw.float().clone().requires_grad_(True)
    loss = module(inputs, targets)
    loss.backward()

    reference_inputs = raw.float().clone().requires_grad_(True)
    q = F.normalize(reference_inputs, dim=1)
    reference_loss = F.cross_entropy(q @ old.t() / 0.05, targets)
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss)
    torch.testing.assert_close(inputs.grad, reference_inputs.grad)  # computed with the old memory

    update = _brute_force_hard_update if use_hard else _brute_force_update
    expected = update(old.double(), F.normalize(raw.float(), dim=1).double(), targets, 0.2).float()
    torch.testing.assert_close(module.features, expected, rtol=0, atol=1e-6)  # updated during backward
    assert not torch.allclose(module.features, old)


def test_memory_is_not_updated_by_the_forward_alone():
    memory, feats, targets = _batch(4)
    module = ClusterMemory(feats.shape[1])
    module.reset(memory.float())
    before = module.features.clone()
    with torch.no_grad():
        module(feats.float(), targets)
    torch.testing.assert_close(module.features, before, rtol=0, atol=0)


def test_reset_normalises_centroids_and_forward_checks_inputs():
    module = ClusterMemory(4)
    with pytest.raises(RuntimeError, match="empty"):
        module(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    module.reset(torch.tensor([[3.0, 0, 0, 4.0], [0, 2.0, 0, 0]]))
    torch.testing.assert_close(module.features.norm(dim=1), torch.ones(2))
    assert module.num_clusters == 2
    with pytest.raises(ValueError, match="cluster ids in 0..1"):
        module(torch.randn(2, 4), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"\(K >= 1, 4\)"):
        module.reset(torch.randn(3, 5))
