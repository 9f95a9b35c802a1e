"""Image decoding with errors that name the file, and the start-up check of every file of a dataset.

``read_image`` fully decodes an image (so a truncated JPEG fails here, not later inside a transform)
and accepts both file paths and ``lmdb://<db>#<key>`` addresses. ``SafeImageReader`` is the
training-time wrapper whose ``skip_corrupt`` option decides between raising and skipping; every
skipped file is logged by name and recorded.

``check_image_files`` runs when a dataset is indexed (``build_dataset``), so a damaged file stops a run
at start-up rather than at the random iteration that first samples it. It reads the first 16 and last
32 bytes of each file: a JPEG must start with the SOI marker and end with EOI (``FF D9``), a PNG start
with its signature and end with the IEND chunk, a BMP / WebP be as long as its header says. Any other
file (a TIFF, a PPM, a file that fails these tests) is decoded by ``read_image``, so the check rejects
exactly the files ``read_image`` rejects, except a JPEG / PNG damaged in its middle but intact at both
ends, which still fails when sampled. Cost on this project's 2-core machine: the real Market-1501 (32,217
JPEGs of the three splits) 0.6 s with the files in the page cache and the machine quiet, 1.5-2.5 s under
load, 3-7 s read from disk; it grows with the file count (MSMT17, 126k files: ~2.5 s cached). TIFFs are
decoded: 2,000 of 256x128 (Occluded-REID's count) take ~4 s. ``lmdb://`` entries are decoded when read.
At LUPerson scale as a plain folder (4.2 M files) the check is one open and two small reads per file on
16 threads; where that is still too slow for every (re)start, ``build_dataset(..., check_images=False)``
(pre-training: ``data.check_images=false``) leaves it out, and a damaged file then fails when sampled
(or is replaced, with ``skip_corrupt``).
"""
from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, ImageFile

from .lmdb_folder import is_lmdb_uri, read_lmdb_bytes

logger = logging.getLogger(__name__)

# These OSErrors mean "cannot reach the file", not "the file is damaged": they propagate unchanged.
_ACCESS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

_warned_truncated_flag = False

# A damaged-file report lists this many files by name, then the count of the others.
MAX_LISTED_FILES = 20
# Threads reading file ends at start-up (I/O bound: the reads release the GIL).
CHECK_THREADS = 16


class CorruptImageError(OSError):
    """An image file exists but cannot be decoded; ``path`` names it, ``cause`` is the decoder error.

    Built from one argument it is a message alone (``path`` and ``cause`` ``None``): that is how a
    DataLoader re-raises a worker's error in the main process, as ``type(error)(message)``.
    """

    def __init__(self, path: str, cause: BaseException | str | None = None, message: str | None = None):
        if cause is None and message is None:
            super().__init__(path)
            self.path, self.cause = None, None
            return
        super().__init__(message or f"cannot decode image {path}: {cause}")
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


def _file_ends(path: str, head_size: int = 16, tail_size: int = 32) -> tuple[bytes, bytes, int]:
    """The first ``head_size`` and last ``tail_size`` bytes of a file, and its size (one open, two reads)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, head_size, 0), os.pread(fd, tail_size, max(0, size - tail_size)), size
    finally:
        os.close(fd)


def _looks_complete(head: bytes, tail: bytes, size: int) -> bool:
    """True when the first / last bytes show a known image format that is not cut short (module docstring)."""
    if head.startswith(b"\xff\xd8\xff"):
        return b"\xff\xd9" in tail  # EOI; entropy-coded data never holds FF D9 (FF is stuffed as FF 00)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" in tail
    if head.startswith(b"BM") and len(head) >= 6:
        return size >= int.from_bytes(head[2:6], "little")
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return size >= int.from_bytes(head[4:8], "little") + 8
    return False  # TIFF, PPM, ...: no cheap end check, so they are decoded


def check_image_files(paths: Iterable[str], threads: int = CHECK_THREADS) -> list[tuple[str, str]]:
    """``(path, reason)`` for every file among ``paths`` that ``read_image`` rejects, found from each file's
    first and last bytes (module docstring: what is checked, what it costs), in the order of ``paths``.
    The reads run on ``threads`` threads: on a network file system each open waits on the server. Missing or
    unreadable files raise as in ``read_image``; ``lmdb://`` entries are skipped."""
    files = [path for path in paths if not is_lmdb_uri(path)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        complete = list(pool.map(lambda path: _looks_complete(*_file_ends(path)), files, chunksize=256))
    damaged = []
    for path in (path for path, ok in zip(files, complete) if not ok):
        try:
            read_image(path)
        except CorruptImageError as exc:
            damaged.append((exc.path, str(exc.cause)))
    return damaged


class DamagedImagesError(CorruptImageError):
    """Image files of a dataset failed the start-up check; ``damaged`` lists ``(path, reason)`` of all of them."""

    def __init__(self, damaged: list[tuple[str, str]], where: str):
        listed = "\n".join(f"  {path}: {reason}" for path, reason in damaged[:MAX_LISTED_FILES])
        more = f"\n  ... and {len(damaged) - MAX_LISTED_FILES} more" if len(damaged) > MAX_LISTED_FILES else ""
        super().__init__(*damaged[0], message=f"{len(damaged)} damaged image file(s) in {where}:\n{listed}{more}\n"
                         "replace them, or skip them with data.skip_corrupt=true (each skipped file is logged)")
        self.damaged = damaged


def drop_damaged_images(paths: Iterable[str], where: str, skip_corrupt: bool) -> set[str]:
    """Check every file (``check_image_files``) and return the damaged ones' paths, which the caller leaves
    out; each is logged by name. Without ``skip_corrupt`` a damaged file raises ``DamagedImagesError``."""
    damaged = check_image_files(paths)
    if damaged and not skip_corrupt:
        raise DamagedImagesError(damaged, where)
    for path, reason in damaged:
        logger.warning("skipping damaged image %s (%s)", path, reason)
    if damaged:
        logger.warning("skip_corrupt: left out %d damaged image file(s) of %s", len(damaged), where)
    return {path for path, _ in damaged}
