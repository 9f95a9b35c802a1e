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
from .images import CorruptImageError, SafeImageReader, read_image

__all__ = [
    "CorruptImageError",
    "DatasetFormatError",
    "DatasetLayoutError",
    "ImageItem",
    "ReIDDataset",
    "SafeImageReader",
    "build_dataset",
    "list_datasets",
    "parse_market_name",
    "read_image",
    "register_dataset",
]
