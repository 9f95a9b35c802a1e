"""Datasets of a fine-tuning run: train set, test set, subsets, training augmentation."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torchvision import transforms as T

from passreid.config import ConfigError
from passreid.data import (DatasetFormatError, ImageItem, ReIDDataset, SafeImageReader, build_dataset,
                           check_data_root, reader_options)
from passreid.data.mask_transforms import MaskedTrainTransform
from passreid.data.masks import DEFAULT_MASK_SUFFIX, PUBLISHED_MASK_SUFFIXES, MaskedImageDataset
from passreid.data.occluders import OccluderPaste
from passreid.data.samplers import ImageDataset
from passreid.data.transforms import build_train_transform
from passreid.finetune.config import FinetuneConfig

__all__ = [
    "FinetuneData",
    "load_finetune_data",
    "load_test_dataset",
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


def _first_test_ids(dataset: ReIDDataset, max_ids: int) -> ReIDDataset:
    """Keep the query/gallery items of the first ``max_ids`` query identities (sorted); distractors go."""
    keep = set(sorted({item.pid for item in dataset.query})[:max_ids])
    query = [item for item in dataset.query if item.pid in keep]
    gallery = [item for item in dataset.gallery if item.pid in keep]
    note = f"query/gallery restricted to the first {max_ids} query identities (data.max_test_ids)"
    return ReIDDataset(dataset.name, dataset.root, dataset.train, query, gallery, dataset.unlabeled,
                       [*dataset.notes, note])


def _drop_unreadable(items: list[ImageItem], split: str) -> list[ImageItem]:
    """``data.skip_corrupt``: decode every image once and drop (and log) the unreadable ones."""
    reader = SafeImageReader(skip_corrupt=True)
    kept = [item for item in items if reader(item.path) is not None]
    if reader.num_skipped:
        logger.warning("data.skip_corrupt: dropped %d unreadable %s image(s): %s", reader.num_skipped, split,
                       ", ".join(reader.skipped_paths))
    return kept


def load_test_dataset(cfg: FinetuneConfig, train_set: ReIDDataset | None = None) -> ReIDDataset:
    """The evaluation set: ``data.test_dataset`` (under ``data.test_root`` or ``data.root``), else the
    query/gallery of ``data.dataset`` (``train_set`` when it is already read); subset and corrupt-image
    options applied."""
    data = cfg.data
    if data.test_dataset:
        test_root = check_data_root(data.test_root or data.root, "data.test_root" if data.test_root else "data.root")
        test_set = build_dataset(data.test_dataset, test_root, skip_corrupt=data.skip_corrupt,
                                 **reader_options(data.test_dataset, data))
    elif train_set is not None:
        test_set = train_set
    else:
        test_set = build_dataset(data.dataset, check_data_root(data.root), skip_corrupt=data.skip_corrupt,
                                 **reader_options(data.dataset, data))
    if not test_set.query or not test_set.gallery:
        raise ValueError(f"test dataset {test_set.name!r} has an empty query or gallery split")
    if data.max_test_ids:
        test_set = _first_test_ids(test_set, data.max_test_ids)
    if data.skip_corrupt:
        test_set = ReIDDataset(test_set.name, test_set.root, test_set.train,
                               _drop_unreadable(test_set.query, "query"),
                               _drop_unreadable(test_set.gallery, "gallery"), test_set.unlabeled, test_set.notes)
    return test_set


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
    test_set = load_test_dataset(cfg, train_set if not data.test_dataset else None)
    if data.skip_corrupt:
        train_set.train = _drop_unreadable(train_set.train, "train")
    if data.max_train_ids or data.max_test_ids or data.skip_corrupt:
        logger.info("splits used by this run (data.max_train_ids / max_test_ids / skip_corrupt):\n%s\n%s",
                    train_set.split_table(), test_set.split_table() if test_set is not train_set else "")
    num_classes = max(item.pid for item in train_set.train) + 1
    num_cameras = max(item.camid for item in train_set.train) + 1
    logger.info("fine-tuning on %s: %d identities, %d images, %d cameras; evaluating on %s: %d query, %d gallery",
                train_set.name, num_classes, len(train_set.train), num_cameras, test_set.name,
                len(test_set.query), len(test_set.gallery))
    return FinetuneData(train_set, test_set, num_classes, num_cameras)


def build_train_set(items: list[ImageItem], cfg: FinetuneConfig) -> ImageDataset:
    """Training images with the TransReID-family augmentation (PASS-reID:
    PASS_transreid/datasets/make_dataloader.py; the same in TransReID and DPM)."""
    data = cfg.data
    from passreid.finetune.methods import get_method  # the registry imports the method modules

    own_train_set = get_method(cfg.method).build_train_set
    if own_train_set is not None:  # the method builds its own samples (e.g. DPEFormer's two views)
        return own_train_set(items, cfg)
    masks_source = _train_masks_source(cfg)
    if masks_source is not None:  # the method trains on (image, part masks) pairs
        return build_masked_train_set(items, cfg, masks_source)
    transform = build_train_transform(tuple(cfg.model.img_size), flip_p=data.flip_p, padding=data.padding,
                                      erasing_p=data.erasing_p, mean=data.pixel_mean, std=data.pixel_std,
                                      erasing=data.erasing)
    return ImageDataset(items, _with_optional_augmentation(transform, cfg))


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


def resolve_occluder_dir(cfg: FinetuneConfig) -> str:
    """``data.occluder_dir``, a folder of cut-outs; ``generated`` (older demos) is a ``ConfigError`` naming the
    folder to pass instead."""
    if cfg.data.occluder_dir == "generated":
        raise ConfigError("config key 'data.occluder_dir': 'generated' is no longer rendered by the stages: render "
                          "the demo world with `python -m passreid.demo --out DIR` and pass "
                          "data.occluder_dir=DIR/world/occluders")
    return cfg.data.occluder_dir


def _with_optional_augmentation(transform: T.Compose, cfg: FinetuneConfig) -> T.Compose:
    """Add ``data.color_jitter`` (right after the resize, as DPM) and ``data.occluder_dir`` (first) when set."""
    data = cfg.data
    steps = list(transform.transforms)
    if data.color_jitter:
        if not isinstance(steps[0], T.Resize):
            raise RuntimeError(f"expected the training pipeline to start with a Resize, got {steps[0]!r}")
        steps.insert(1, T.ColorJitter(*data.color_jitter))
    if data.occluder_dir:
        folder = resolve_occluder_dir(cfg)
        paste = OccluderPaste(folder, p=data.occluder_p, area=tuple(data.occluder_area))
        logger.info("occluder paste: %r from %s", paste, folder)
        steps.insert(0, paste)
    return T.Compose(steps) if len(steps) != len(transform.transforms) else transform
