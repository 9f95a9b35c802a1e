"""Evaluation of a fine-tuned model: test features in sample order, then the retrieval core.

Features come from :func:`passreid.eval.features.extract_features` (eval mode, gathered by sample
index under DDP), metrics from :func:`passreid.eval.rank_metrics` (Rank-k, mAP, mINP on L2-normalised
features unless ``eval.feat_norm`` is false, squared Euclidean distance, as
PASS-reID: PASS_transreid/utils/metrics.py, ``R1_mAP_eval``)
and, when ``eval.rerank`` is set, from k-reciprocal re-ranking with the configured ``k1, k2, lambda``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from passreid.config.schema import EvalConfig
from passreid.data import ImageItem, ReIDDataset
from passreid.data.samplers import ImageDataset, ShardSampler
from passreid.data.transforms import build_test_transform
from passreid.engine.preemption import PreemptibleDataLoader
from passreid.seeding import worker_init_fn
from passreid.eval.distance import DistanceChunkFn
from passreid.eval.features import ExtractedFeatures, extract_features
from passreid.eval.rank import RankResult, rank_metrics, rank_metrics_from_distance

__all__ = ["EvalResult", "TestDistanceBuilder", "build_test_loader", "evaluate_features", "evaluate_model",
           "extract_split", "format_result", "summarize"]

logger = logging.getLogger(__name__)

# A method's own test distance: (config, query features, gallery features, device) -> a function giving the
# distances of query rows [start, end) to the whole gallery (e.g. DPM's visible-part distance).
TestDistanceBuilder = Callable[[Any, ExtractedFeatures, ExtractedFeatures, torch.device], DistanceChunkFn]


@dataclass
class EvalResult:
    """Features of both splits, the plain rank metrics and (optionally) the re-ranked ones."""

    query: ExtractedFeatures
    gallery: ExtractedFeatures
    plain: RankResult
    reranked: RankResult | None
    rerank_params: dict[str, float] | None

    @property
    def metrics(self) -> dict[str, float]:
        """Flat scalars: ``rank1, rank5, rank10, mAP, mINP`` (fractions), plus ``rerank_*`` when computed."""
        scalars = summarize(self.plain)
        if self.reranked is not None:
            scalars.update({f"rerank_{key}": value for key, value in summarize(self.reranked).items()})
        return scalars

    def to_json(self) -> dict[str, Any]:
        """What ``metrics.json`` holds: scalars, full CMC curves, counts and the re-ranking parameters."""
        record: dict[str, Any] = {**self.metrics, "plain": self.plain.to_dict()}
        if self.reranked is not None:
            record["reranked"] = self.reranked.to_dict()
            record["rerank_params"] = self.rerank_params
        return record


def summarize(result: RankResult) -> dict[str, float]:
    """``rank1/5/10`` (those within the CMC length), ``mAP`` and ``mINP`` as fractions in [0, 1]."""
    scalars = {f"rank{k}": result.rank(k) for k in (1, 5, 10) if k <= len(result.cmc)}
    scalars.update(mAP=result.mAP, mINP=result.mINP)
    return scalars


def build_test_loader(items: list[ImageItem], img_size: tuple[int, int], cfg: Any, rank: int = 0,
                      world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """Ordered (sharded under DDP) loader with the test transform (resize + normalise).

    ``cfg`` is a stage config whose ``data`` section holds ``pixel_mean, pixel_std, test_interpolation,
    test_batch_size, num_workers`` (fine-tuning's and USL's both do).
    """
    data = cfg.data
    dataset = ImageDataset(items, build_test_transform(tuple(img_size), mean=data.pixel_mean, std=data.pixel_std,
                                                       interpolation=data.test_interpolation))
    return PreemptibleDataLoader(
        dataset,
        batch_size=data.test_batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=data.num_workers,
        pin_memory=pin_memory,
        worker_init_fn=worker_init_fn,
        generator=torch.Generator().manual_seed(0),
    )


class _CameraFeed:
    """Iterates a test loader and exposes the current batch's camera ids to the feature function.

    :func:`extract_features` hands the feature function the images only; SIE models also need the
    camera ids. The feature function is called right after each batch is drawn, in the same thread,
    so ``current`` always belongs to the images being processed (checked by batch size).
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.dataset = loader.dataset
        self.current: Tensor | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.current = torch.as_tensor(batch["camid"])
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def camids_for(self, images: Tensor) -> Tensor:
        if self.current is None or self.current.shape[0] != images.shape[0]:
            raise RuntimeError("camera ids of the current test batch are out of step with its images")
        return self.current.to(images.device)


def _uses_cameras(model: nn.Module) -> bool:
    return getattr(model, "sie_embed", None) is not None


def extract_split(model: nn.Module, items: list[ImageItem], img_size: tuple[int, int], cfg: Any,
                  device: torch.device, autocast: Callable | None = None, rank: int = 0,
                  world_size: int = 1, split: str = "test") -> ExtractedFeatures:
    """Test features of ``items`` (the model's eval forward) in item order, on every rank; a long extraction
    logs ``<split> features: batch i/n ...`` lines with rate and ETA (:func:`extract_features`)."""
    loader = build_test_loader(items, img_size, cfg, rank, world_size, pin_memory=device.type == "cuda")
    label = f"{split} features"
    if not _uses_cameras(model):
        return extract_features(model, loader, feature_fn=lambda m, images: m(images), device=device,
                                autocast=autocast, label=label)
    feed = _CameraFeed(loader)
    return extract_features(model, feed, feature_fn=lambda m, images: m(images, camids=feed.camids_for(images)),
                            device=device, autocast=autocast, label=label)


def evaluate_features(query: ExtractedFeatures, gallery: ExtractedFeatures, eval_cfg: EvalConfig,
                      device: torch.device | None = None,
                      distance: Callable[[int, int], Tensor] | None = None) -> EvalResult:
    """Rank metrics of saved/extracted features (plus re-ranking when ``eval_cfg.rerank``).

    ``distance`` is a method's own query-chunked test distance over these features (see
    :class:`~passreid.finetune.methods.FinetuneMethod`'s ``build_test_distance``); ``None`` uses ``eval_cfg.metric``.
    """
    labels = (query.pids, gallery.pids, query.camids, gallery.camids)
    if distance is not None:
        if eval_cfg.rerank:
            raise ValueError("eval.rerank re-ranks single feature vectors; this method evaluates with its own "
                             "test distance, so set eval.rerank=false")
        plain = rank_metrics_from_distance(distance, *labels, max_rank=eval_cfg.max_rank, device=device)
        return EvalResult(query, gallery, plain, None, None)
    plain = rank_metrics(query.feats, gallery.feats, *labels, metric=eval_cfg.metric, normalize=eval_cfg.feat_norm,
                         max_rank=eval_cfg.max_rank, device=device)
    reranked, params = None, None
    if eval_cfg.rerank:
        from passreid.eval.rerank import re_ranking  # only imported when asked for

        params = {"k1": eval_cfg.k1, "k2": eval_cfg.k2, "lambda_value": eval_cfg.lambda_value}
        distance = re_ranking(query.feats, gallery.feats, eval_cfg.k1, eval_cfg.k2, eval_cfg.lambda_value,
                              normalize=eval_cfg.feat_norm, device=device)
        reranked = rank_metrics_from_distance(distance, *labels, max_rank=eval_cfg.max_rank, device=device)
    return EvalResult(query, gallery, plain, reranked, params)


def evaluate_model(model: nn.Module, dataset: ReIDDataset, img_size: tuple[int, int], cfg: Any,
                   device: torch.device, autocast: Callable | None = None, rank: int = 0,
                   world_size: int = 1, test_distance: TestDistanceBuilder | None = None) -> EvalResult | None:
    """Extract query and gallery features of ``dataset`` (a collective under DDP) and compute the rank
    metrics on rank 0 (with ``test_distance``, a method's own test distance, when given); other ranks
    return ``None``. ``cfg`` is a stage config with ``data`` (:func:`build_test_loader`) and ``eval``."""
    query = extract_split(model, dataset.query, img_size, cfg, device, autocast, rank, world_size, split="query")
    gallery = extract_split(model, dataset.gallery, img_size, cfg, device, autocast, rank, world_size, split="gallery")
    if rank != 0:
        return None
    distance = test_distance(cfg, query, gallery, device) if test_distance is not None else None
    return evaluate_features(query, gallery, cfg.eval, device=device, distance=distance)


def format_result(result: EvalResult) -> str:
    """Printable Rank-k / mAP / mINP table(s), with the re-ranking parameters when used."""
    text = "plain\n" + result.plain.format_table()
    if result.reranked is not None:
        params = ", ".join(f"{k}={v}" for k, v in (result.rerank_params or {}).items())
        text += f"\nre-ranked ({params})\n" + result.reranked.format_table()
    return text
