"""Fine-tuning losses: identity cross-entropy and batch-hard triplet (PASS-reID:
PASS_transreid/loss/make_loss.py, loss/triplet_loss.py; the same in TransReID).

A model's training output is a :class:`ReIDTrainOutput`: one or more *branches* (the global head,
plus e.g. JPM's local heads), each with classifier logits (computed on post-BN features) and the
pre-BN feature that the triplet loss uses, and a weight. :class:`ReIDCriterion` sums
``weight_b * (id_weight * CE_b + triplet_weight * T_b)`` over the branches and adds any
method-specific terms the model put in ``extra_losses`` (already weighted by the method).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ReIDTrainOutput",
    "ReIDCriterion",
    "batch_hard_triplet_loss",
    "euclidean_dist",
    "identity_loss",
]


@dataclass
class ReIDTrainOutput:
    """What a re-ID model returns in training mode.

    ``logits[b]`` (B, C) and ``feats[b]`` (B, F_b) belong to branch ``b`` with weight ``weights[b]``
    (the weights of the published recipes sum to 1). ``extra_losses`` are additional, already
    weighted loss terms of a method (added to the total as they are). They are scalars of this
    process's samples, so ``train.ddp_batch=global`` (which gathers the per-sample tensors of the
    output from every process) refuses them: a method meant for it computes such terms in its
    criterion from per-sample outputs.
    """

    logits: list[Tensor]
    feats: list[Tensor]
    weights: list[float]
    extra_losses: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (len(self.logits) == len(self.feats) == len(self.weights) >= 1):
            raise ValueError(
                f"ReIDTrainOutput needs as many logits, feats and weights (>= 1), got "
                f"{len(self.logits)}, {len(self.feats)}, {len(self.weights)}"
            )


def identity_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy averaged over the batch, computed in float32.

    With ``label_smoothing = eps`` the target distribution is ``(1 - eps) onehot + eps / C``, which
    is the published ``CrossEntropyLabelSmooth`` (and PyTorch's ``label_smoothing``).
    """
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def euclidean_dist(x: Tensor, y: Tensor) -> Tensor:
    """``sqrt(clamp(||x||² + ||y||² − 2 x·y, min=1e-12))``: (M, N) distances, as the published code.

    The clamp keeps the gradient of ``sqrt`` finite on the zero diagonal.
    """
    x, y = x.float(), y.float()
    squared = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * x @ y.t()
    return squared.clamp(min=1e-12).sqrt()


def batch_hard_triplet_loss(feats: Tensor, labels: Tensor, margin: float | None = None) -> Tensor:
    """Batch-hard triplet loss on un-normalised features (Euclidean distance, :func:`euclidean_dist`).

    For each anchor: ``d_ap`` = the largest distance to an item with its label (itself included,
    distance ~0, so an anchor without another positive still has one), ``d_an`` = the smallest
    distance to an item with another label. ``margin=None`` gives the soft margin
    ``mean(log(1 + exp(d_ap − d_an)))``; a number gives ``mean(max(0, d_ap − d_an + margin))``.
    Works for any label counts (the published view(N, -1) mining assumes P x K batches; equal there).
    """
    if feats.ndim != 2 or labels.ndim != 1 or feats.shape[0] != labels.shape[0]:
        raise ValueError(
            f"triplet loss expects feats (N, D) and labels (N,), got {tuple(feats.shape)} and {tuple(labels.shape)}"
        )
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    if bool(same.all()):
        raise ValueError("triplet loss needs at least two identities in the batch (no negatives found)")
    dist = euclidean_dist(feats, feats)
    hardest_positive = dist.masked_fill(~same, float("-inf")).amax(dim=1)
    hardest_negative = dist.masked_fill(same, float("inf")).amin(dim=1)
    gap = hardest_positive - hardest_negative
    if margin is None:
        return F.softplus(gap).mean()
    return F.relu(gap + margin).mean()


class ReIDCriterion(nn.Module):
    """``sum_b w_b (id_weight · CE(logits_b) + triplet_weight · T(feats_b)) + sum(extra_losses)``.

    ``forward`` returns a dict of scalar tensors: ``loss`` (the total to back-propagate), ``id``
    and ``triplet`` (branch-weighted, before the id/triplet weights), every extra term, and
    ``acc`` (top-1 accuracy of the first branch, no gradient).
    """

    def __init__(
        self,
        id_weight: float = 1.0,
        triplet_weight: float = 1.0,
        label_smoothing: float = 0.0,
        triplet_margin: float | None = None,
    ) -> None:
        super().__init__()
        self.id_weight = id_weight
        self.triplet_weight = triplet_weight
        self.label_smoothing = label_smoothing
        self.triplet_margin = triplet_margin

    def forward(self, output: ReIDTrainOutput, targets: Tensor) -> dict[str, Tensor]:
        id_term = sum(
            w * identity_loss(logits, targets, self.label_smoothing)
            for w, logits in zip(output.weights, output.logits)
        )
        triplet_term = sum(
            w * batch_hard_triplet_loss(feats, targets, self.triplet_margin)
            for w, feats in zip(output.weights, output.feats)
        )
        total = self.id_weight * id_term + self.triplet_weight * triplet_term
        terms = {"id": id_term, "triplet": triplet_term}
        for name, value in output.extra_losses.items():
            if name in ("loss", "id", "triplet", "acc"):
                raise ValueError(f"extra loss name {name!r} clashes with a built-in term")
            total = total + value
            terms[name] = value
        with torch.no_grad():
            accuracy = (output.logits[0].argmax(dim=1) == targets).float().mean()
        return {"loss": total, **terms, "acc": accuracy}
