"""Losses shared by the supervised stages: identity cross-entropy and batch-hard triplet over a model's branches.

The PASS pre-training loss (DINO-style self-distillation) belongs to its algorithm and lives in
:mod:`passreid.pretrain.loss`; Cluster-Contrast's memory loss in :mod:`passreid.usl.memory`.
"""
from passreid.losses.reid import ReIDCriterion, ReIDTrainOutput, batch_hard_triplet_loss, euclidean_dist, identity_loss

__all__ = ["ReIDCriterion", "ReIDTrainOutput", "batch_hard_triplet_loss", "euclidean_dist", "identity_loss"]
