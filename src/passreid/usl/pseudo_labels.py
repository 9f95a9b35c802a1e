"""One clustering step of Cluster Contrast: features -> Jaccard + DBSCAN -> pseudo labels and centroids.

As the published loop (PASS-reID: PASS_cluster_contrast_reid/examples/cluster_contrast_train_usl.py): the eval-mode features of the whole target train set (in sample order) go through
the k-reciprocal Jaccard distance and DBSCAN (:func:`passreid.cluster.dbscan_pseudo_labels`, the sparse,
memory-bounded implementation, exact for ``eps < 1``); outliers (``-1``) are dropped for the epoch; the
memory starts from the L2-normalised mean feature of every cluster, in label order.

The Jaccard step sees the model output as it is (``cluster.feat_norm: false``, published: PASS-reID,
PASS_cluster_contrast_reid/examples/cluster_contrast_train_usl.py hands the extracted features to
clustercontrast/utils/faiss_rerank.py unchanged, which ranks by L2 and weights with ``2 − 2 x·y``). The
single-neck (USL) feature is unit-norm anyway; the multi-neck (UDA) feature has norms in [1, √2] (``cat``)
or <= 1 (``mean``), so ``cluster.feat_norm: true`` (L2-normalise first) changes its pseudo labels. Centroids
are means of the raw features, L2-normalised, as published in both modes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from passreid.cluster import NoClustersError, dbscan_pseudo_labels
from passreid.usl.config import ClusterConfig

__all__ = ["ClusterStats", "NoClustersError", "PseudoLabels", "cluster_centroids", "cluster_features", "cluster_statistics"]

logger = logging.getLogger(__name__)


@dataclass
class ClusterStats:
    """What one clustering step produced; purity / ARI only when true labels are known."""

    num_clusters: int
    num_outliers: int
    num_samples: int
    purity: float | None = None  # share of clustered samples whose true id is their cluster's majority id
    ari: float | None = None  # adjusted Rand index over all samples, outliers as one class (passreid's own diagnostic; the published code logs no ARI)
    ari_clustered: float | None = None  # adjusted Rand index over the clustered samples only
    num_true_ids: int | None = None

    def scalars(self) -> dict[str, float]:
        """Flat numbers for ``metrics.jsonl`` (unknown ones left out)."""
        values = {"clusters": self.num_clusters, "outliers": self.num_outliers, "samples": self.num_samples}
        for key in ("purity", "ari", "ari_clustered", "num_true_ids"):
            if getattr(self, key) is not None:
                values[key] = getattr(self, key)
        return values

    def format(self) -> str:
        text = f"{self.num_clusters} clusters, {self.num_outliers} outliers of {self.num_samples} images"
        if self.purity is not None:
            text += (f"; against the {self.num_true_ids} true ids: purity {self.purity:.3f}, ARI {self.ari:.3f} "
                     f"(clustered only {self.ari_clustered:.3f})")
        return text


@dataclass
class PseudoLabels:
    """Cluster id per train sample (``-1`` = outlier), the cluster centroids and the statistics."""

    labels: np.ndarray  # (N,) int64
    centroids: torch.Tensor  # (K, D) float32, L2-normalised, row c = cluster c
    stats: ClusterStats


def cluster_centroids(feats: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """L2-normalised mean of the rows of ``feats`` per label ``0..K-1`` (outliers ignored), shape (K, D)."""
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    keep = labels_t >= 0
    num_clusters = int(labels_t.max()) + 1 if bool(keep.any()) else 0
    sums = torch.zeros(num_clusters, feats.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels_t[keep], feats[keep].double())
    counts = torch.bincount(labels_t[keep], minlength=num_clusters).clamp_(min=1).unsqueeze(1)
    return F.normalize((sums / counts).float(), dim=1)


def cluster_statistics(labels: np.ndarray, true_ids: np.ndarray | None) -> ClusterStats:
    """Counts, and purity / ARI against ``true_ids`` when given."""
    labels = np.asarray(labels, dtype=np.int64)
    clustered = labels >= 0
    stats = ClusterStats(num_clusters=int(labels.max()) + 1 if clustered.any() else 0,
                         num_outliers=int((~clustered).sum()), num_samples=int(labels.size))
    if true_ids is None:
        return stats
    true_ids = np.asarray(true_ids, dtype=np.int64)
    if true_ids.shape != labels.shape:
        raise ValueError(f"true ids {true_ids.shape} and pseudo labels {labels.shape} differ in length")
    stats.num_true_ids = int(np.unique(true_ids).size)
    stats.ari = float(adjusted_rand_score(true_ids, labels))
    if clustered.any():
        stats.ari_clustered = float(adjusted_rand_score(true_ids[clustered], labels[clustered]))
        majority = 0
        for cluster in np.unique(labels[clustered]):
            majority += int(np.bincount(_dense(true_ids[labels == cluster])).max())
        stats.purity = majority / int(clustered.sum())
    else:
        stats.ari_clustered, stats.purity = 0.0, 0.0
    return stats


def _dense(ids: np.ndarray) -> np.ndarray:
    return np.unique(ids, return_inverse=True)[1]


def cluster_features(feats: torch.Tensor, cfg: ClusterConfig, true_ids: np.ndarray | None = None,
                     device: torch.device | str | None = None) -> PseudoLabels:
    """Pseudo labels of ``feats`` (N, D, the model output in sample order): DBSCAN over the k-reciprocal
    Jaccard distance of the rows as they are (or L2-normalised, ``cfg.feat_norm``), centroids of the raw
    rows, statistics (module docstring)."""
    feats = torch.as_tensor(feats, dtype=torch.float32).cpu()
    labels = dbscan_pseudo_labels(feats, eps=cfg.eps, min_samples=cfg.min_samples, k1=cfg.k1, k2=cfg.k2,
                                  normalize=cfg.feat_norm, require_unit=False, backend=cfg.knn_backend,
                                  device=device)
    labels = np.asarray(labels, dtype=np.int64)
    return PseudoLabels(labels, cluster_centroids(feats, labels), cluster_statistics(labels, true_ids))
