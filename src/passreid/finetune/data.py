"""Datasets of a fine-tuning run: the labelled train set (identity subset, a method's own samples or masks) and
the test set (:mod:`passreid.data.reid_sets`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch.utils.data import Dataset

from passreid.config import ConfigError
from passreid.data import DatasetFormatError, ImageItem, ReIDDataset, build_dataset, check_data_root, reader_options
from passreid.data.mask_transforms import MaskedTrainTransform
from passreid.data.masks import DEFAULT_MASK_SUFFIX, PUBLISHED_MASK_SUFFIXES, MaskedImageDataset
from passreid.data.reid_sets import build_image_train_set, drop_unreadable, load_test_dataset
from passreid.finetune.config import FinetuneConfig

__all__ = [
    "FinetuneData",
    "build_train_set",
    "load_finetune_data",
]

logger = logging.getLogger(__name__)


@dataclass
class FinetuneData:
    """The training identities and the evaluation split of one run."""

    train: ReIDDataset  # its train split is what the run trains on
    test: ReIDDataset  # its query/gallery splits are what the run evaluates on
    num_classes: int
    num_cameras: int  # training cameras (camids 0..num_cameras-1): the SIE table size


def _first_train_ids(dataset: ReIDDataset, max_ids: int) -> ReIDDataset:
    """Keep the identities relabelled 0..max_ids-1 (already contiguous, so labels stay valid)."""
    train = [item for item in dataset.train if item.pid < max_ids]
    note = f"train restricted to the first {max_ids} identities (data.max_train_ids)"
    return ReIDDataset(dataset.name, dataset.root, train, dataset.query, dataset.gallery,
                       dataset.unlabeled, [*dataset.notes, note])


def load_finetune_data(cfg: FinetuneConfig) -> FinetuneData:
    """Read the training set and the test set (``data.test_dataset`` or the training set's own query/gallery)."""
    data = cfg.data
    train_set = build_dataset(data.dataset, check_data_root(data.root), skip_corrupt=data.skip_corrupt,
                              **reader_options(data.dataset, data))
    if not train_set.train or train_set.unlabeled:
        why = "its images are unlabelled" if train_set.unlabeled else "its train split is empty"
        raise DatasetFormatError(f"dataset {data.dataset!r} at {train_set.root} has no labelled train split to "
                                 f"fine-tune on ({why}); set data.dataset / data.root to a labelled re-ID set (train "
                                 f"on it, and test on this one with data.test_dataset / data.test_root)")
    if data.max_train_ids:
        train_set = _first_train_ids(train_set, data.max_train_ids)
    test_set = load_test_dataset(data, train_set if not data.test_dataset else None)
    if data.skip_corrupt:
        train_set.train = drop_unreadable(train_set.train, "train")
    if data.max_train_ids or data.max_test_ids or data.skip_corrupt:
        logger.info("splits used by this run (data.max_train_ids / max_test_ids / skip_corrupt):\n%s\n%s",
                    train_set.split_table(), test_set.split_table() if test_set is not train_set else "")
    num_classes = max(item.pid for item in train_set.train) + 1
    num_cameras = max(item.camid for item in train_set.train) + 1
    check_test_cameras(test_set, num_cameras, cfg.model.sie_camera)
    logger.info("fine-tuning on %s: %d identities, %d images, %d cameras; evaluating on %s: %d query, %d gallery",
                train_set.name, num_classes, len(train_set.train), num_cameras, test_set.name,
                len(test_set.query), len(test_set.gallery))
    return FinetuneData(train_set, test_set, num_classes, num_cameras)


def check_test_cameras(test_set: ReIDDataset, num_cameras: int, sie_camera: bool) -> None:
    """With SIE, refuse a test set whose cameras the model has no embedding for (one per training camera):
    found before training, not at the first evaluation."""
    if not sie_camera:
        return
    cameras = {item.camid for item in (*test_set.query, *test_set.gallery)}
    unseen = sorted(camid for camid in cameras if not 0 <= camid < num_cameras)
    if unseen:
        raise ConfigError(
            f"config key 'model.sie_camera': the test set {test_set.name} ({test_set.root}) has camera ids "
            f"{unseen} (0-based) that the model's {num_cameras} training cameras do not cover, and SIE cannot "
            "embed an unseen camera: set model.sie_camera=false, or test on a set with the training cameras")


def build_train_set(items: list[ImageItem], cfg: FinetuneConfig) -> Dataset:
    """Training images with the TransReID-family augmentation (PASS-reID:
    PASS_transreid/datasets/make_dataloader.py; the same in TransReID and DPM), a method's own samples, or
    (image, part masks) pairs when the method trains on masks."""
    from passreid.finetune.methods import get_method  # the registry imports the method modules

    own_train_set = get_method(cfg.method).build_train_set
    if own_train_set is not None:  # the method builds its own samples (e.g. DPEFormer's two views)
        return own_train_set(items, cfg)
    masks_source = _train_masks_source(cfg)
    if masks_source is not None:  # the method trains on (image, part masks) pairs
        return build_masked_train_set(items, cfg, masks_source)
    return build_image_train_set(items, cfg.data, tuple(cfg.model.img_size))


def _train_masks_source(cfg: FinetuneConfig) -> str | None:
    from passreid.finetune.methods import get_method  # the registry imports the method modules

    needs = get_method(cfg.method).train_masks
    return needs(cfg) if needs is not None else None


def build_masked_train_set(items: list[ImageItem], cfg: FinetuneConfig, masks_source: str) -> MaskedImageDataset:
    """Images with their parsing masks (``"parsing"``) or an all-foreground mask (``"constant"``), both through
    the mask-aware augmentation (passreid.data.mask_transforms). Missing mask files are an error."""
    data = cfg.data
    if data.color_jitter or data.occluder_dir:
        raise ConfigError("data.color_jitter / data.occluder_dir are not supported by the mask-aware pipeline "
                          f"of method {cfg.method!r}")
    transform = MaskedTrainTransform(tuple(cfg.model.img_size), grouping=data.mask_preprocess, flip_p=data.flip_p,
                                     padding=data.padding, erasing_p=data.erasing_p, erasing=data.mask_erasing,
                                     mean=data.pixel_mean, std=data.pixel_std, background=data.mask_background,
                                     background_threshold=data.mask_background_threshold,
                                     softmax_weight=data.mask_softmax_weight, mask_scale=data.mask_scale)
    suffix = data.masks_suffix or PUBLISHED_MASK_SUFFIXES.get(data.dataset, DEFAULT_MASK_SUFFIX)
    logger.info("training with %s masks (%s, %s/%s*%s)", masks_source, data.mask_preprocess, data.masks_dir,
                "<split>", suffix)
    return MaskedImageDataset(items, transform, masks_dir=data.masks_dir, suffix=suffix, masks_source=masks_source)
