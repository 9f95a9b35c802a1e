"""Data: dataset readers (one registry), image decoding, LMDB access.

Samplers, transforms and the synthetic generator live in sibling modules
(``passreid.data.samplers``, ``.transforms``, ``.synthetic``) and are imported from there.
"""
from .datasets import (
    DatasetFormatError,
    DatasetLayoutError,
    ImageItem,
    ReIDDataset,
    build_dataset,
    list_datasets,
    parse_market_name,
    register_dataset,
)
from .images import CorruptImageError, DamagedImagesError, SafeImageReader, check_image_files, read_image

__all__ = [
    "CorruptImageError",
    "DamagedImagesError",
    "DatasetFormatError",
    "DatasetLayoutError",
    "ImageItem",
    "ReIDDataset",
    "SafeImageReader",
    "build_dataset",
    "check_image_files",
    "list_datasets",
    "parse_market_name",
    "read_image",
    "register_dataset",
]
