"""Millions of image paths in two numpy arrays instead of one Python object each.

A DataLoader worker is a fork of the training process. Every Python object it reads has its reference count
written, so the memory page holding it is copied into the worker: over an epoch of random reads, each worker
ends up with a private copy of much of a list of path strings. For LUPerson (4.18 M crops, ~800 MB as
``ImageItem`` tuples) that is hundreds of MB per worker, times 10 workers per GPU (bench/README.md has the
figures). A :class:`PathTable` keeps the paths as UTF-8 bytes in one array plus their end offsets, with their
common prefix stored once (an LMDB's ``lmdb://<db>#`` or a folder's root), so workers read them without
writing anything and share the parent's pages.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["PathTable"]


class PathTable(Sequence):
    """A read-only sequence of ``str`` paths held in numpy arrays (module docstring); ``table[i]`` is path ``i``."""

    def __init__(self, paths: Iterable[str]) -> None:
        paths = paths if isinstance(paths, list) else list(paths)
        self.prefix = os.path.commonprefix(paths) if paths else ""
        cut = len(self.prefix)
        blob = bytearray()
        ends = np.empty(len(paths), dtype=np.int64)
        for index, path in enumerate(paths):
            blob += path[cut:].encode("utf-8")
            ends[index] = len(blob)
        self._bytes = np.frombuffer(blob, dtype=np.uint8)
        self._ends = ends

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]  # no slices: one path at a time
        count = len(self._ends)
        if not -count <= index < count:
            raise IndexError(f"PathTable index {index} out of range for {count} paths")
        index %= count
        start = int(self._ends[index - 1]) if index else 0
        return self.prefix + self._bytes[start:int(self._ends[index])].tobytes().decode("utf-8")

    @property
    def nbytes(self) -> int:
        """Memory held by the table's arrays and prefix."""
        return self._bytes.nbytes + self._ends.nbytes + len(self.prefix.encode("utf-8"))
