"""Image decoding with errors that name the file.

``read_image`` fully decodes an image (so a truncated JPEG fails here, not later inside a transform)
and accepts both file paths and ``lmdb://<db>#<key>`` addresses. ``SafeImageReader`` is the
training-time wrapper whose ``skip_corrupt`` option decides between raising and skipping; every
skipped file is logged by name and recorded.
"""
from __future__ import annotations

import io
import logging
import os

from PIL import Image, ImageFile

from .lmdb_folder import is_lmdb_uri, read_lmdb_bytes

logger = logging.getLogger(__name__)

# These OSErrors mean "cannot reach the file", not "the file is damaged": they propagate unchanged.
_ACCESS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

_warned_truncated_flag = False


class CorruptImageError(OSError):
    """An image file exists but cannot be decoded; ``path`` names it, ``cause`` is the decoder error."""

    def __init__(self, path: str, cause: BaseException | str):
        super().__init__(f"cannot decode image {path}: {cause}")
        self.path = path
        self.cause = cause


def _warn_if_truncation_is_masked() -> None:
    # Another library may set this global; PIL then pads truncated images instead of failing.
    global _warned_truncated_flag
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated_flag:
        _warned_truncated_flag = True
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images will be padded "
                       "instead of raising CorruptImageError")


def read_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file (or an ``lmdb://`` entry) completely and return it as RGB.

    Raises ``CorruptImageError`` (naming the file and the decoder's reason) for damaged or
    truncated data, and ``FileNotFoundError`` when the file or LMDB key does not exist.
    """
    path = os.fspath(path)
    _warn_if_truncation_is_masked()
    source = io.BytesIO(read_lmdb_bytes(path)) if is_lmdb_uri(path) else path
    try:
        with Image.open(source) as image:
            image.load()
            return image.convert("RGB")
    except _ACCESS_ERRORS:
        raise
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(path, exc) from exc


class SafeImageReader:
    """``read_image`` with an explicit policy for damaged files.

    ``skip_corrupt=False``: a damaged file raises ``CorruptImageError``.
    ``skip_corrupt=True``: the call returns ``None``; the file is logged by name (warning) and added
    to ``skipped`` (list of ``(path, reason)``). The caller decides what to read instead.
    Counts are per process: each DataLoader worker holds its own copy.
    """

    def __init__(self, skip_corrupt: bool = False):
        self.skip_corrupt = skip_corrupt
        self.skipped: list[tuple[str, str]] = []

    @property
    def num_skipped(self) -> int:
        """How many damaged files this reader has skipped."""
        return len(self.skipped)

    @property
    def skipped_paths(self) -> list[str]:
        """Paths of the skipped files, in the order they were met."""
        return [path for path, _ in self.skipped]

    def __call__(self, path: str | os.PathLike) -> Image.Image | None:
        """Return the RGB image, or ``None`` for a damaged file when skipping is enabled."""
        try:
            return read_image(path)
        except CorruptImageError as exc:
            if not self.skip_corrupt:
                raise
            self.skipped.append((exc.path, str(exc.cause)))
            logger.warning("skipping corrupt image %s (%s); %d skipped so far",
                           exc.path, exc.cause, self.num_skipped)
            return None
