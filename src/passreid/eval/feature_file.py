"""The feature file the tools pass to each other: an ``.npz`` written by ``finetune/test.py`` and
``tools/extract_features.py``, read by ``tools/evaluate.py``, ``cluster_features.py``, ``visualize_ranks.py``
and ``search.py``.

=========  ==========================================  =====================================================
key        content                                     needed by
=========  ==========================================  =====================================================
``feats``  ``(N, D)`` float32, one row per image       every reader
``pids``   ``(N,)`` int, identity (-1: junk / unknown)  evaluation and rank visualisation
``camids`` ``(N,)`` int, 0-based camera                 evaluation and rank visualisation
``paths``  ``(N,)`` str, the image files                search (thumbnails), rank visualisation (optional)
``model``  str, ``describe()`` of the extracting model  search checks a gallery was extracted by its model
=========  ==========================================  =====================================================

Files are written atomically (:func:`passreid.atomic_files.atomic_write`) to exactly the path given (numpy
would append ``.npz`` to a path without it), and read without pickles. Every problem is a
:class:`FeatureFileError` naming the file and what was expected.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from passreid.atomic_files import atomic_write
from passreid.feature_inputs import EvaluationInputError

__all__ = ["FeatureFile", "FeatureFileError", "read_feature_file", "write_feature_file"]

LABEL_KEYS = ("pids", "camids")


class FeatureFileError(EvaluationInputError):
    """A feature file is missing, unreadable, or lacks or holds malformed arrays."""


@dataclass
class FeatureFile:
    """The arrays of one feature file; optional ones are ``None`` when the file does not hold them."""

    feats: np.ndarray                 # (N, D) float32
    pids: np.ndarray | None = None    # (N,) int64
    camids: np.ndarray | None = None  # (N,) int64
    paths: list[str] | None = None
    model: str | None = None


def write_feature_file(path: str | os.PathLike, feats: np.ndarray, *, pids: np.ndarray | None = None,
                       camids: np.ndarray | None = None, paths: Sequence[str] | None = None,
                       model: str | None = None) -> Path:
    """Write the arrays given (module docstring) to ``path``, atomically; returns ``path``."""
    arrays = {"feats": np.ascontiguousarray(feats, dtype=np.float32)}
    if pids is not None:
        arrays["pids"] = np.asarray(pids, dtype=np.int64)
    if camids is not None:
        arrays["camids"] = np.asarray(camids, dtype=np.int64)
    if paths is not None:
        arrays["paths"] = np.asarray([str(p) for p in paths], dtype=str)
    if model is not None:
        arrays["model"] = np.asarray(model, dtype=str)
    for key, values in arrays.items():
        if key not in ("feats", "model") and len(values) != len(arrays["feats"]):
            raise ValueError(f"write_feature_file: {len(values)} {key} for {len(arrays['feats'])} feature rows")
    return atomic_write(path, lambda handle: np.savez(handle, **arrays), what="feature file")


def read_feature_file(path: str | os.PathLike, require: Iterable[str] = ()) -> FeatureFile:
    """Read and check a feature file; ``require``: keys besides ``feats`` that must be there."""
    path = Path(path)
    required = ["feats", *(key for key in require if key != "feats")]
    arrays = _read_arrays(path, required)
    feats = _checked_feats(path, arrays["feats"])
    labels = {key: _checked_labels(path, key, arrays[key], len(feats)) for key in LABEL_KEYS if key in arrays}
    paths = None
    if "paths" in arrays:
        paths = [str(p) for p in arrays["paths"].reshape(-1)]
        if len(paths) != len(feats):
            raise FeatureFileError(f"{path}: 'paths' has {len(paths)} entries but 'feats' has {len(feats)} rows")
    model = str(arrays["model"]) if "model" in arrays else None
    return FeatureFile(feats, labels.get("pids"), labels.get("camids"), paths, model)


def _read_arrays(path: Path, required: list[str]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FeatureFileError(f"feature file not found: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic == b"\x93NUMPY":
        raise FeatureFileError(f"{path}: expected an .npz archive holding 'feats', got a plain array file (.npy)")
    if not magic.startswith(b"PK"):
        raise FeatureFileError(f"{path}: cannot read it as an .npz archive (not a zip file: it starts with "
                               f"{magic!r}); expected a feature file of tools/extract_features.py or finetune/test.py")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise FeatureFileError(f"{path}: cannot read it as an .npz archive ({error})") from error
    with archive:
        missing = [key for key in required if key not in archive.files]
        if missing:
            raise FeatureFileError(f"{path}: missing key(s) {missing}; expected {required}, "
                                   f"found {sorted(archive.files)}")
        try:
            return {key: archive[key] for key in archive.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise FeatureFileError(f"{path}: cannot read its arrays ({error})") from error


def _checked_feats(path: Path, feats: np.ndarray) -> np.ndarray:
    if feats.ndim != 2:
        raise FeatureFileError(f"{path}: 'feats' must be a 2-D (N, D) array, got shape {feats.shape}")
    if feats.shape[0] == 0 or feats.shape[1] == 0:
        raise FeatureFileError(f"{path}: 'feats' is empty (shape {feats.shape})")
    if not np.issubdtype(feats.dtype, np.floating):
        raise FeatureFileError(f"{path}: 'feats' must hold floating-point values, got dtype {feats.dtype}")
    # One float64 sum is finite exactly when every value is (no overflow below 1e300): a gallery of millions of
    # rows is not copied into an (N, D) mask unless something is wrong.
    if np.isfinite(feats.sum(dtype=np.float64)):
        return np.ascontiguousarray(feats, dtype=np.float32)
    bad_rows = np.flatnonzero(~np.isfinite(feats).all(axis=1))
    if bad_rows.size:
        raise FeatureFileError(f"{path}: 'feats' has NaN/Inf values in {bad_rows.size} row(s), "
                               f"first at row {bad_rows[0]}")
    return np.ascontiguousarray(feats, dtype=np.float32)


def _checked_labels(path: Path, key: str, values: np.ndarray, rows: int) -> np.ndarray:
    if values.ndim != 1 or values.dtype.kind not in "iu":
        raise FeatureFileError(f"{path}: '{key}' must be a 1-D integer array, got shape {values.shape} "
                               f"dtype {values.dtype}")
    if len(values) != rows:
        raise FeatureFileError(f"{path}: '{key}' has {len(values)} entries but 'feats' has {rows} rows")
    return values.astype(np.int64)
