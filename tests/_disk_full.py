"""Simulate a disk that fills up while a checkpoint is written: the real serializer writes into a file whose
``write`` raises ``OSError(ENOSPC)`` once the free space is used, as the kernel does on a full disk."""
from __future__ import annotations

import builtins
import errno
import io
import os

import pytest

from passreid import atomic_files


class DiskFullFile(io.FileIO):
    """A binary file on a disk with ``free`` bytes left."""

    free = 0

    def write(self, data) -> int:
        if len(data) > self.free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.free -= len(data)
        return super().write(data)


def fill_disk(monkeypatch: pytest.MonkeyPatch, free_bytes: int = 1024) -> None:
    """From now on, files that passreid.atomic_files opens for writing (every atomic write: checkpoints,
    exports, feature files) hold at most ``free_bytes``."""
    DiskFullFile.free = free_bytes

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        if "w" in mode and "b" in mode:
            return DiskFullFile(file, "wb")
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(atomic_files, "open", open_on_full_disk, raising=False)
