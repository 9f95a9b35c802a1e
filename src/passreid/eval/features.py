"""Feature extraction for evaluation: eval-mode forward over a loader, gathered in sample order."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from passreid import dist
from passreid.engine.logger import ThroughputLogger
from passreid.eval.feature_file import write_feature_file

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 30.0  # seconds between progress lines of a long extraction (a short one logs none)


def cls_feature(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The [CLS] output of a backbone whose forward returns (B, T, D) leading tokens."""
    return model(images)[:, 0]


def pass_fusion_feature(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """PASS test feature ``cat(CLS, mean(parts))`` (2D wide); falls back to [CLS] without part tokens."""
    tokens = model(images)
    if tokens.shape[1] == 1:
        return tokens[:, 0]
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)


@dataclass
class ExtractedFeatures:
    """Features of one split in dataset order, plus the labels the evaluator needs."""

    feats: np.ndarray  # (N, D) float32
    pids: np.ndarray  # (N,) int64
    camids: np.ndarray  # (N,) int64

    def save_npz(self, path: str | os.PathLike, paths: Sequence[str] | None = None) -> Path:
        """Write the feature file (:mod:`passreid.eval.feature_file`) that ``tools/evaluate.py`` reads, with the
        images' ``paths`` when given (``tools/visualize_ranks.py`` then needs no data set)."""
        return write_feature_file(path, self.feats, pids=self.pids, camids=self.camids, paths=paths)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: DataLoader,
    *,
    feature_fn: FeatureFn = pass_fusion_feature,
    device: torch.device | str | None = None,
    autocast: Callable | None = None,
    label: str = "features",
    log_interval_s: float = PROGRESS_INTERVAL_S,
) -> ExtractedFeatures:
    """Run ``model`` in eval mode over ``loader`` and return features in sample-index order.

    The loader yields dicts with ``img``, ``pid``, ``camid`` and ``index`` (``ImageDataset``). Under
    DDP each rank sees a shard; features are gathered by ``index`` so every rank returns the whole
    split in dataset order, whatever the sharding or padding. A pass longer than ``log_interval_s`` logs
    its progress (``<label>: batch i/n (k images)  r images/s  eta h:mm:ss``) at most that often, and its
    totals at the end (``ThroughputLogger``); full Market-1501 on a CPU takes minutes.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    was_training = model.training
    model.eval()
    progress = ThroughputLogger(label, len(loader) if hasattr(loader, "__len__") else None, logger,
                                interval_s=log_interval_s)
    feats, pids, camids, indices = [], [], [], []
    for batch in loader:
        images = batch["img"].to(device, non_blocking=True)
        if autocast is not None:
            with autocast():
                out = feature_fn(model, images)
        else:
            out = feature_fn(model, images)
        feats.append(out.float().cpu())
        pids.append(torch.as_tensor(batch["pid"]))
        camids.append(torch.as_tensor(batch["camid"]))
        indices.append(torch.as_tensor(batch["index"]))
        progress.update(len(images))
    progress.finish()
    model.train(was_training)

    total = len(loader.dataset)
    local_index = torch.cat(indices).long()
    # Labels ride along as two extra float columns (exact below 2**24) so one gather suffices.
    labels = torch.stack([torch.cat(pids), torch.cat(camids)], dim=1).float()
    local = torch.cat([torch.cat(feats), labels], dim=1)
    if dist.get_world_size() > 1:
        gathered = dist.all_gather_by_index(local, local_index, total)
    else:
        gathered = _order_by_index(local, local_index, total)
    return ExtractedFeatures(
        feats=gathered[:, :-2].numpy().astype(np.float32),
        pids=gathered[:, -2].round().long().numpy(),
        camids=gathered[:, -1].round().long().numpy(),
    )


def _order_by_index(rows: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    if index.numel() != total or not torch.equal(index.sort().values, torch.arange(total)):
        raise RuntimeError(
            f"feature extraction saw {index.numel()} samples for a split of {total}: "
            "the loader must visit every sample exactly once (no drop_last, no shuffling sampler)"
        )
    out = torch.empty_like(rows)
    out[index] = rows
    return out
