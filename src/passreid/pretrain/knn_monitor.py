"""kNN retrieval monitor: is the teacher learning features that tell people apart?

Self-supervised losses say little about feature quality (a collapsed run can have a low loss).
This monitor extracts the teacher backbone's features for a labeled query/gallery set and
ranks the gallery for every query (the re-ID protocol of :func:`passreid.eval.rank_metrics`:
same-camera matches of the same identity are ignored). No training happens here: mAP and
Rank-1 of the raw features, i.e. a nearest-neighbour probe.

Sets:

* any labeled dataset of the registry (``monitor.dataset=market1501``, ``monitor.root=...``);
* ``generated_pool``: the persons of a pool folder that training has not seen (the demo's
  ``monitor_world/pool``, another world seed than the training pool's). Each pool person is rendered in
  several shots in one scene, so the task is to tell a person from the others of the same scene: query = each person's first shot, gallery = the other shots,
  camid = shot index. This is the set on which short CPU runs show learning (pretrain/README.md):
  the generated ``market/`` split also needs invariance to its cameras' lighting and backgrounds,
  which the pool (one scene per video) does not teach.

Under DDP each rank extracts a disjoint shard; features are gathered in dataset order.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from passreid import dist
from passreid.data import DatasetLayoutError, ImageItem, ReIDDataset, build_dataset
from passreid.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from passreid.data.samplers import ImageDataset, ShardSampler
from passreid.data.transforms import build_test_transform
from passreid.engine import PreemptibleDataLoader
from passreid.eval import rank_metrics
from passreid.eval.features import cls_feature, extract_features, pass_fusion_feature
from passreid.pretrain.config import GENERATED_POOL, KnnMonitorConfig


# Pool file names written by passreid.demo.world: <video>/<video:03d>_<person:02d>_<shot:02d>.jpg
_POOL_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)\.jpg$")


def generated_pool_identities(pool_dir: str | os.PathLike) -> ReIDDataset:
    """A query/gallery set from a generated pool: pid = (video, person), camid = shot index.

    Query: every person's first shot; gallery: all other shots. Raises ``DatasetLayoutError`` when
    the folder does not hold generator-named pool images.
    """
    pool_dir = Path(pool_dir)
    query, gallery, others = [], [], []
    for path in sorted(pool_dir.glob("*/*")):
        match = _POOL_NAME.match(path.name)
        if match is None:
            others.append(path.name)
            continue
        video, person, shot = (int(group) for group in match.groups())
        item = ImageItem(str(path), pid=video * 1000 + person, camid=shot)
        (query if shot == 0 else gallery).append(item)
    if not query or not gallery or others:
        raise DatasetLayoutError(
            f"{GENERATED_POOL}: {pool_dir} is not a generated pool (expected <video>/<video>_<person>_<shot>.jpg "
            f"as written by passreid.demo.world, with shots 0 and 1+; found {len(query)} first shots, "
            f"{len(gallery)} other shots, {len(others)} other files)")
    return ReIDDataset(GENERATED_POOL, str(pool_dir), [], query, gallery,
                       notes=["query: first shot of each pool person; gallery: the other shots"])


class KnnMonitor:
    """Rank-based kNN evaluation of a backbone on one labeled query/gallery set.

    Args:
        cfg: the ``monitor`` config section.
        root: the labeled set's folder (for ``generated_pool``: the pool folder).
        device: where the backbone runs.
        num_workers: DataLoader workers for decoding the images.
    """

    def __init__(self, cfg: KnnMonitorConfig, root: str | os.PathLike, device: torch.device,
                 num_workers: int = 0) -> None:
        self.cfg = cfg
        self.device = device
        if cfg.dataset == GENERATED_POOL:
            dataset = generated_pool_identities(root)
        else:
            dataset = build_dataset(cfg.dataset, root)
        if not dataset.query or not dataset.gallery:
            raise ValueError(f"kNN monitor: dataset {cfg.dataset!r} at {root} has no query/gallery split; "
                             f"use a labeled re-ID set (e.g. market1501)")
        self.dataset_label = f"{cfg.dataset} ({root})"
        self.num_query, self.num_gallery = len(dataset.query), len(dataset.gallery)
        # Pre-training normalises with the ImageNet statistics, so the probe does too.
        transform = build_test_transform(cfg.img_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self._query_loader = self._loader(dataset.query, transform, num_workers)
        self._gallery_loader = self._loader(dataset.gallery, transform, num_workers)
        self._feature_fn = pass_fusion_feature if cfg.feature == "pass_fusion" else cls_feature

    def _loader(self, items: list[ImageItem], transform, num_workers: int) -> DataLoader:
        sampler = ShardSampler(len(items), dist.get_rank(), dist.get_world_size())
        # A private generator: creating the iterator must not draw from the global torch RNG, or
        # evaluating would shift the training's random streams (and break exact resume).
        return PreemptibleDataLoader(ImageDataset(items, transform), batch_size=self.cfg.batch_size,
                                     sampler=sampler, num_workers=num_workers,
                                     generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, autocast=None) -> dict[str, float]:
        """mAP / Rank-1 / Rank-5 / mINP of ``backbone``'s features (every rank gets the same numbers)."""
        query = extract_features(backbone, self._query_loader, feature_fn=self._feature_fn,
                                 device=self.device, autocast=autocast, label="kNN monitor query features")
        gallery = extract_features(backbone, self._gallery_loader, feature_fn=self._feature_fn,
                                   device=self.device, autocast=autocast, label="kNN monitor gallery features")
        scores = None
        if dist.is_main_process():
            result = rank_metrics(query.feats, gallery.feats, query.pids, gallery.pids, query.camids,
                                  gallery.camids, metric=self.cfg.metric, device=self.device)
            cmc = result.cmc
            scores = {"mAP": float(result.mAP), "rank1": float(cmc[0]),
                      "rank5": float(cmc[min(4, len(cmc) - 1)]), "mINP": float(result.mINP)}
        return dist.broadcast_object(scores)
