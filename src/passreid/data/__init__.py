"""Data: dataset readers (one registry), image decoding, LMDB access.

Samplers and transforms live in sibling modules (``passreid.data.samplers``, ``.transforms``) and are imported
from there. The demo's generated world is not here: :mod:`passreid.demo` renders folders that these readers read.
"""
from .datasets import (
    DatasetFormatError,
    DatasetLayoutError,
    ImageItem,
    ReIDDataset,
    build_dataset,
    check_data_root,
    list_datasets,
    reader_options,
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
    "check_data_root",
    "check_image_files",
    "list_datasets",
    "parse_market_name",
    "read_image",
    "reader_options",
    "register_dataset",
]
