"""Atomic file writes: a reader sees the old file or the complete new one, never a part.

Every file passreid writes for a user to read back (checkpoints, exports, feature files, configs, schedules,
reports) goes through :func:`atomic_write`: the content goes to a uniquely named temp file beside the target,
is flushed and fsynced, then ``os.replace``d over the target, and the directory is fsynced. A process killed
mid-write leaves the previous file intact plus an orphan temp file (``.<name>.tmp-<host>-<pid>-<token>``),
which the next write of the same target removes when its writer is dead (:func:`remove_stale_temp_files`).
A full disk or quota is an ``OSError(ENOSPC)`` that says the previous file is intact.

The two halves (:func:`write_temp`, :func:`commit`) are public for writers that act between them
(``passreid.engine.Checkpointer`` keeps the file it replaces). This module imports nothing from passreid, so
every package may use it.
"""
from __future__ import annotations

import errno
import os
import socket
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "atomic_write_text", "commit", "fsync_directory", "link_atomically", "new_temp_path",
           "remove_stale_temp_files", "write_temp"]

TEMP_MARKER = ".tmp-"

Writer = Callable[[BinaryIO], object]


def _temp_prefix(target: Path) -> str:
    return f".{target.name}{TEMP_MARKER}"


def new_temp_path(target: Path) -> Path:
    """A temp name unique per host, process and call, in ``target``'s directory."""
    return target.with_name(f"{_temp_prefix(target)}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_directory(directory: Path) -> None:
    """Make a rename durable. Filesystems without directory fsync are accepted as they are."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(target: str | os.PathLike[str]) -> list[Path]:
    """Delete temp files of ``target`` left by writers on this host that have died.

    Files of live processes, or from other hosts (shared filesystems: we cannot tell whether their writer is
    alive), are left alone; they are never read, so they cannot break a write or a read. Returns what was
    removed.
    """
    target = Path(target)
    prefix = _temp_prefix(target)
    host = socket.gethostname()
    removed = []
    for candidate in target.parent.iterdir():
        if not candidate.name.startswith(prefix):
            continue
        parts = candidate.name[len(prefix):].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if _process_is_alive(int(parts[1])):
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except FileNotFoundError:
            pass
    return removed


def _out_of_space(error: BaseException) -> bool:
    """Whether ``error`` or an exception it was raised from is a full disk or quota. torch's zip writer turns
    the file's ``OSError(ENOSPC)`` into a ``RuntimeError`` ("unexpected pos") with the OSError as context."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def write_temp(target: Path, write: Writer, what: str = "file") -> Path:
    """``write(handle)`` into a new temp file beside ``target``, flushed and fsynced; returns the temp path.

    On failure the temp file is removed. A full disk raises ``OSError(ENOSPC)`` saying that ``target`` (the
    previous ``what``, when there is one) is intact.
    """
    directory = target.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write {target}: directory {directory} does not exist")
    remove_stale_temp_files(target)
    temp = new_temp_path(target)
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if _out_of_space(error):
            kept = (f"the previous {what} {target} is intact" if target.is_file()
                    else f"no earlier {what} existed at {target}")
            raise OSError(errno.ENOSPC, f"no space left on device while writing {target}; {kept}") from error
        raise
    return temp


def commit(temp: Path, target: Path) -> None:
    """``os.replace`` the complete ``temp`` over ``target`` and make the rename durable."""
    try:
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def link_atomically(source: Path, destination: Path) -> bool:
    """Make ``destination`` a hard link of ``source`` (replacing it atomically); False where the filesystem
    has no hard links (nothing is changed then)."""
    remove_stale_temp_files(destination)
    temp = new_temp_path(destination)
    try:
        os.link(source, temp)  # same inode: no second write of a large file
    except OSError:
        return False
    commit(temp, destination)
    return True


def atomic_write(path: str | os.PathLike[str], write: Writer, *, what: str = "file") -> Path:
    """Write ``path`` through ``write(handle)`` (a binary file object) so that readers only ever see a complete
    file (module docstring); returns ``path`` as a ``Path``. Its folder must exist."""
    target = Path(path)
    commit(write_temp(target, write, what), target)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, *, what: str = "file") -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")), what=what)
