"""The labelled re-ID sets of a run, read through the shared ``data`` section
(:class:`passreid.config.ReIDDataConfig`): the evaluation split (another data set, subsets, damaged images) and
the training images with the TransReID-family augmentation. Fine-tuning and Cluster Contrast both read theirs here.
"""
from __future__ import annotations

import logging

from torchvision import transforms as T

from passreid.config import ConfigError, ReIDDataConfig
from passreid.data.datasets import ImageItem, ReIDDataset, build_dataset, check_data_root, reader_options
from passreid.data.images import SafeImageReader
from passreid.data.occluders import OccluderPaste
from passreid.data.samplers import ImageDataset
from passreid.data.transforms import build_train_transform

__all__ = ["build_image_train_set", "drop_unreadable", "first_test_ids", "load_test_dataset", "resolve_occluder_dir"]

logger = logging.getLogger(__name__)


def first_test_ids(dataset: ReIDDataset, max_ids: int) -> ReIDDataset:
    """Keep the query/gallery items of the first ``max_ids`` query identities (sorted); distractors go."""
    keep = set(sorted({item.pid for item in dataset.query})[:max_ids])
    query = [item for item in dataset.query if item.pid in keep]
    gallery = [item for item in dataset.gallery if item.pid in keep]
    note = f"query/gallery restricted to the first {max_ids} query identities (data.max_test_ids)"
    return ReIDDataset(dataset.name, dataset.root, dataset.train, query, gallery, dataset.unlabeled,
                       [*dataset.notes, note])


def drop_unreadable(items: list[ImageItem], split: str) -> list[ImageItem]:
    """``data.skip_corrupt``: decode every image once and drop (and log) the unreadable ones."""
    reader = SafeImageReader(skip_corrupt=True)
    kept = [item for item in items if reader(item.path) is not None]
    if reader.num_skipped:
        logger.warning("data.skip_corrupt: dropped %d unreadable %s image(s): %s", reader.num_skipped, split,
                       ", ".join(reader.skipped_paths))
    return kept


def load_test_dataset(data: ReIDDataConfig, train_set: ReIDDataset | None = None) -> ReIDDataset:
    """The evaluation set: ``data.test_dataset`` (under ``data.test_root`` or ``data.root``), else the
    query/gallery of ``data.dataset`` (``train_set`` when it is already read); subset and corrupt-image
    options applied."""
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
        test_set = first_test_ids(test_set, data.max_test_ids)
    if data.skip_corrupt:
        test_set = ReIDDataset(test_set.name, test_set.root, test_set.train,
                               drop_unreadable(test_set.query, "query"),
                               drop_unreadable(test_set.gallery, "gallery"), test_set.unlabeled, test_set.notes)
    return test_set


def build_image_train_set(items: list[ImageItem], data: ReIDDataConfig, img_size: tuple[int, int]) -> ImageDataset:
    """Training images at ``img_size`` with the TransReID-family augmentation (PASS-reID:
    PASS_transreid/datasets/make_dataloader.py; the same in TransReID and DPM; ``data.erasing`` selects
    Cluster-Contrast's erasing), plus ``data.color_jitter`` / ``data.occluder_dir`` when set."""
    transform = build_train_transform(img_size, flip_p=data.flip_p, padding=data.padding, erasing_p=data.erasing_p,
                                      mean=data.pixel_mean, std=data.pixel_std, erasing=data.erasing)
    return ImageDataset(items, _with_optional_augmentation(transform, data))


def resolve_occluder_dir(data: ReIDDataConfig) -> str:
    """``data.occluder_dir``, a folder of cut-outs; ``generated`` (older demos) is a ``ConfigError`` naming the
    folder to pass instead."""
    if data.occluder_dir == "generated":
        raise ConfigError("config key 'data.occluder_dir': 'generated' is no longer rendered by the stages: render "
                          "the demo world with `python -m passreid.demo --out DIR` and pass "
                          "data.occluder_dir=DIR/world/occluders")
    return data.occluder_dir


def _with_optional_augmentation(transform: T.Compose, data: ReIDDataConfig) -> T.Compose:
    """Add ``data.color_jitter`` (right after the resize, as DPM) and ``data.occluder_dir`` (first) when set."""
    steps = list(transform.transforms)
    if data.color_jitter:
        if not isinstance(steps[0], T.Resize):
            raise RuntimeError(f"expected the training pipeline to start with a Resize, got {steps[0]!r}")
        steps.insert(1, T.ColorJitter(*data.color_jitter))
    if data.occluder_dir:
        folder = resolve_occluder_dir(data)
        paste = OccluderPaste(folder, p=data.occluder_p, area=tuple(data.occluder_area))
        logger.info("occluder paste: %r from %s", paste, folder)
        steps.insert(0, paste)
    return T.Compose(steps) if len(steps) != len(transform.transforms) else transform
