"""The pre-training input: the image list of ``data.*``, the multi-crop dataset seeded per sample, and the
per-epoch loader (views made by the workers, or with ``data.augment_on=gpu`` on the training device).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from passreid.config import ConfigError
from passreid.data import ImageItem, SafeImageReader, build_dataset
from passreid.data.device_multicrop import BatchedMultiCrop, collate_device_samples, device_sample_views
from passreid.data.multicrop import MultiCropAugmentation
from passreid.data.path_table import PathTable
from passreid.data.samplers import ResumableDistributedSampler
from passreid.engine import PreemptibleDataLoader, derive_seed, seeded_global_rngs, worker_init_fn
from passreid.pretrain.config import PretrainConfig
logger = logging.getLogger(__name__)

Views = list[torch.Tensor]


_PURPOSE_SAMPLE, _PURPOSE_LOADER = 0, 1  # keep the derived streams of different uses apart


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch``."""
    return derive_seed(_PURPOSE_SAMPLE, seed, epoch, index)


class MultiCropDataset(Dataset):
    """Unlabeled images -> ``{"views": [2 + n_local tensors], "index", "skipped"}`` (with a
    ``MultiCropParamSampler`` transform, ``"views"`` holds its ``DeviceSample`` instead).

    The augmentation of sample ``i`` in epoch ``e`` is seeded from ``(seed, e, i)`` (call
    :meth:`set_epoch` before creating each epoch's DataLoader iterator). With ``skip_corrupt``
    an undecodable image is replaced by the next readable one in the list; ``skipped`` counts
    the replaced files (the reader logs each by name). The paths are kept in a :class:`PathTable`, so that
    the DataLoader workers do not each copy millions of Python strings.
    """

    def __init__(self, items: Sequence[ImageItem], transform: Callable[[Any], Views], seed: int,
                 skip_corrupt: bool = False) -> None:
        if not items:
            raise ValueError("MultiCropDataset: no images")
        self.paths = PathTable(item.path for item in items)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.reader = SafeImageReader(skip_corrupt=skip_corrupt)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation streams :meth:`__getitem__` uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.paths)):
            image = self.reader(self.paths[(index + offset) % len(self.paths)])
            if image is not None:
                return image, offset
        raise RuntimeError(f"MultiCropDataset: none of the {len(self.paths)} images could be decoded")

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, skipped = self._read(index)
        with seeded_global_rngs(sample_seed(self.seed, self.epoch, index)):
            views = self.transform(image)
        return {"views": views, "index": index, "skipped": skipped}


def collate_views(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-sample view lists into one list of batched tensors (view order kept)."""
    num_views = len(samples[0]["views"])
    if any(len(sample["views"]) != num_views for sample in samples):
        raise ValueError("collate_views: samples carry different numbers of views")
    return {
        "views": [torch.stack([sample["views"][v] for sample in samples]) for v in range(num_views)],
        "index": torch.tensor([sample["index"] for sample in samples]),
        "skipped": sum(sample["skipped"] for sample in samples),
    }


def resolve_data_items(cfg: PretrainConfig) -> list[ImageItem]:
    """The unlabeled items of ``data.dataset`` under ``data.root``."""
    data = cfg.data
    checks = {"skip_corrupt": data.skip_corrupt, "check_images": data.check_images}
    if data.dataset == "image_folder":
        dataset = build_dataset("image_folder", data.root, **checks,
                                **({"file_list": data.file_list} if data.file_list else {}))
    else:
        dataset = build_dataset("luperson_lmdb", data.root, **checks,
                                **({"keys_file": data.keys_file} if data.keys_file else {}))
    logger.info("pre-training data: %s at %s, %d images", data.dataset, dataset.root, len(dataset.train))
    return dataset.train


def build_multicrop(cfg: PretrainConfig) -> MultiCropAugmentation:
    """The multi-crop transform described by ``cfg.crops``."""
    crops = cfg.crops
    return MultiCropAugmentation(
        global_size=tuple(crops.global_size), local_size=tuple(crops.local_size),
        global_scale=tuple(crops.global_scale), local_scale=tuple(crops.local_scale),
        local_crops_number=crops.local_crops_number, mode=crops.mode,
    )


class EpochLoader:
    """Builds each epoch's DataLoader from one dataset + resumable sampler."""

    def __init__(self, cfg: PretrainConfig, dataset: MultiCropDataset, rank: int, world_size: int,
                 device: torch.device, on_device: BatchedMultiCrop | None = None) -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.device = device
        self.on_device = on_device  # data.augment_on=gpu: the views are made here, batched on the device
        self.batch_size = cfg.data.batch_size_per_gpu
        self.sampler = ResumableDistributedSampler(len(dataset), shuffle=True, seed=cfg.train.seed, rank=rank,
                                                   world_size=world_size, drop_last=True)
        self.iters_per_epoch = len(self.sampler) // self.batch_size
        if self.iters_per_epoch < 1:
            raise ConfigError(
                f"config key 'data.batch_size_per_gpu': the pre-training data has {len(dataset)} images, fewer "
                f"than one global batch ({self.batch_size} per GPU x {world_size} processes); lower it")
        self.pin_memory = cfg.data.pin_memory and device.type == "cuda"

    def batches(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        """Batches of ``epoch`` from batch ``start`` on (the sampler skips what was consumed)."""
        self.sampler.load_state_dict({"epoch": epoch, "position": start * self.batch_size})
        self.dataset.set_epoch(epoch)
        workers = self.cfg.data.num_workers
        loader = PreemptibleDataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=collate_views if self.on_device is None else collate_device_samples,
            pin_memory=self.pin_memory, drop_last=True,
            worker_init_fn=worker_init_fn if workers else None,
            generator=torch.Generator().manual_seed(derive_seed(_PURPOSE_LOADER, self.cfg.train.seed, epoch)),
            prefetch_factor=2 if workers else None, persistent_workers=False,
        )
        if self.on_device is None:
            return iter(loader)
        return ({**batch, "views": device_sample_views(batch, self.on_device, self.device)} for batch in loader)


class BatchSource(Protocol):
    """What the stage reads its batches from: the folder/LMDB pipeline (:class:`EpochLoader`) by default, or
    a pipeline of one's own passed to :func:`run_pretraining` (e.g. another decoder, or pre-made batches)."""

    iters_per_epoch: int  # optimizer steps per epoch

    def batches(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        """Batches of ``epoch`` from batch ``start`` on, each ``{"views": [2 + local_crops_number tensors of this
        process], "skipped": <corrupt images replaced>}``; the same for the same (epoch, start) for exact resume."""
        ...




__all__ = ["BatchSource", "EpochLoader", "MultiCropDataset", "Views", "build_multicrop", "collate_views",
           "resolve_data_items", "sample_seed"]
