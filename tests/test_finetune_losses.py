"""Fine-tuning losses against slow, obviously-correct versions."""
from __future__ import annotations

import math

import pytest
import torch

from passreid.losses.reid import ReIDCriterion, ReIDTrainOutput, batch_hard_triplet_loss, euclidean_dist, identity_loss


def brute_force_triplet(feats: torch.Tensor, labels: torch.Tensor, margin: float | None) -> float:
    """Per anchor: farthest same-label item (itself included), nearest other-label item; loops only."""
    n = feats.shape[0]
    total = 0.0
    for a in range(n):
        d_ap, d_an = 0.0, math.inf
        for j in range(n):
            d = math.sqrt(max(sum((float(feats[a, k]) - float(feats[j, k])) ** 2 for k in range(feats.shape[1])),
                              1e-12))
            if labels[j] == labels[a]:
                d_ap = max(d_ap, d)
            else:
                d_an = min(d_an, d)
        gap = d_ap - d_an
        total += math.log1p(math.exp(gap)) if margin is None else max(0.0, gap + margin)
    return total / n


@pytest.mark.parametrize("margin", [None, 0.3])
def test_batch_hard_triplet_matches_brute_force(margin):
    generator = torch.Generator().manual_seed(0)
    feats = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
    expected = brute_force_triplet(feats, labels, margin)
    got = batch_hard_triplet_loss(feats, labels, margin)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_triplet_handles_uneven_label_counts_and_singletons():
    feats = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [4.0, 4.0], [4.0, 5.0]], dtype=torch.float64)
    labels = torch.tensor([7, 7, 8, 9, 9])
    assert float(batch_hard_triplet_loss(feats, labels, 0.3)) == pytest.approx(
        brute_force_triplet(feats, labels, 0.3), rel=1e-6)


def test_triplet_needs_two_identities():
    with pytest.raises(ValueError, match="at least two identities"):
        batch_hard_triplet_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def test_euclidean_dist_is_clamped_sqrt_with_finite_gradient():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]], requires_grad=True)
    dist = euclidean_dist(x, x)
    assert dist[0, 1].item() == pytest.approx(math.sqrt(4 + 9), rel=1e-6)
    assert dist[0, 0].item() == pytest.approx(1e-6, rel=1e-3)  # sqrt of the 1e-12 clamp
    dist.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_identity_loss_matches_the_smoothed_target_formula(epsilon):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, generator=generator)
    targets = torch.tensor([0, 4, 2, 2, 1, 3])
    log_p = torch.log_softmax(logits, dim=1)
    q = torch.full((6, 5), epsilon / 5) + (1 - epsilon) * torch.nn.functional.one_hot(targets, 5)
    expected = -(q * log_p).sum(1).mean()
    assert float(identity_loss(logits, targets, epsilon)) == pytest.approx(float(expected), rel=1e-6)


def test_criterion_weights_branches_and_adds_extra_terms():
    generator = torch.Generator().manual_seed(2)
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = [torch.randn(6, 3, generator=generator) for _ in range(3)]
    feats = [torch.randn(6, 4, generator=generator) for _ in range(3)]
    weights = [0.5, 0.25, 0.25]
    extra = {"orth": torch.tensor(0.7)}
    criterion = ReIDCriterion(id_weight=1.0, triplet_weight=2.0, label_smoothing=0.0, triplet_margin=None)
    terms = criterion(ReIDTrainOutput(logits, feats, weights, extra), targets)
    id_term = sum(w * torch.nn.functional.cross_entropy(lg, targets) for w, lg in zip(weights, logits))
    tri_term = sum(w * batch_hard_triplet_loss(f, targets) for w, f in zip(weights, feats))
    assert float(terms["id"]) == pytest.approx(float(id_term), rel=1e-6)
    assert float(terms["triplet"]) == pytest.approx(float(tri_term), rel=1e-6)
    assert float(terms["loss"]) == pytest.approx(float(id_term + 2.0 * tri_term + 0.7), rel=1e-6)
    assert float(terms["acc"]) == pytest.approx(float((logits[0].argmax(1) == targets).float().mean()))


def test_train_output_rejects_inconsistent_branches():
    with pytest.raises(ValueError, match="as many logits, feats and weights"):
        ReIDTrainOutput([torch.zeros(2, 3)], [], [1.0])
