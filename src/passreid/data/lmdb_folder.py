"""Reading images stored in an LMDB database (the LUPerson release format).

Format (established from the public LUPerson code, DengpanFu/LUPerson: ``LUP/convert_lmdb.py`` writes
it, ``lup_moco/libs/dataset.py`` and the fast-reid ``LUP`` dataset read it):

* a release folder ``<release>/lmdb/`` (an LMDB environment: ``data.mdb``, ``lock.mdb``) next to
  ``<release>/keys.pkl``;
* each LMDB entry: key = ASCII image key such as ``00_00_0000_00000000``
  (``<country>_<city>_<video>_<image>``), value = the original encoded JPEG file bytes;
* ``keys.pkl``: a pickled ``list`` of the keys (as ``convert_lmdb.py`` writes it) or a ``dict`` with a
  ``"keys"`` list (plus optional ``"pids"``/``"vids"``, which we do not use), as the loaders read it.

Images are addressed as ``lmdb://<absolute db folder>#<percent-encoded key>`` strings so that an item
list stays picklable and cheap. Environments are opened lazily, read-only, without locking, once per
process: a DataLoader worker opens its own handle on its first read, never one inherited via fork.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote_from_bytes, unquote_to_bytes

if TYPE_CHECKING:
    import lmdb

logger = logging.getLogger(__name__)

LMDB_URI_PREFIX = "lmdb://"
KEY_FILE_NAME = "keys.pkl"

# Keys such as "__keys__" / "__len__" hold metadata in some LMDB image converters, never an image.
_METADATA_KEY = re.compile(rb"^__.*__$")

_env_lock = threading.Lock()
_env_cache: dict[str, lmdb.Environment] = {}
_env_cache_pid: int | None = None


def make_lmdb_uri(db_path: str | os.PathLike, key: bytes | str) -> str:
    """Return the ``lmdb://<db>#<key>`` address of one entry (the key is percent-encoded)."""
    key_bytes = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return f"{LMDB_URI_PREFIX}{os.path.abspath(db_path)}#{quote_from_bytes(key_bytes, safe='')}"


def is_lmdb_uri(path: str | os.PathLike) -> bool:
    """True when ``path`` is an ``lmdb://`` address rather than a file path."""
    return isinstance(path, str) and path.startswith(LMDB_URI_PREFIX)


def parse_lmdb_uri(uri: str) -> tuple[str, bytes]:
    """Split ``lmdb://<db>#<key>`` into the database folder and the raw key bytes."""
    if not is_lmdb_uri(uri):
        raise ValueError(f"not an LMDB address (expected 'lmdb://<db folder>#<key>'): {uri!r}")
    db_path, sep, quoted_key = uri[len(LMDB_URI_PREFIX):].rpartition("#")
    if not sep or not db_path or not quoted_key:
        raise ValueError(f"malformed LMDB address (expected 'lmdb://<db folder>#<key>'): {uri!r}")
    return db_path, unquote_to_bytes(quoted_key)


def open_lmdb(db_path: str | os.PathLike) -> lmdb.Environment:
    """Open an LMDB environment read-only, without locking (safe for many reader processes)."""
    import lmdb  # here, not at import: only LMDB data sets need the package

    db_path = os.fspath(db_path)
    if not os.path.exists(db_path):
        raise FileNotFoundError(f"LMDB database {db_path} does not exist")
    return lmdb.open(db_path, subdir=os.path.isdir(db_path), readonly=True, lock=False,
                     readahead=False, meminit=False, max_readers=2048)


def _cached_env(db_path: str) -> lmdb.Environment:
    """Per-process environment cache; handles inherited through fork are dropped, never used."""
    global _env_cache_pid
    with _env_lock:
        if _env_cache_pid != os.getpid():
            _env_cache.clear()
            _env_cache_pid = os.getpid()
        env = _env_cache.get(db_path)
        if env is None:
            env = open_lmdb(db_path)
            _env_cache[db_path] = env
        return env


def read_lmdb_bytes(uri: str) -> bytes:
    """Return the stored value (encoded image bytes) of an ``lmdb://`` address."""
    db_path, key = parse_lmdb_uri(uri)
    with _cached_env(db_path).begin(write=False) as txn:
        value = txn.get(key)
    if value is None:
        raise FileNotFoundError(f"key {key!r} not found in LMDB database {db_path} (address {uri})")
    return bytes(value)


def lmdb_entry_count(db_path: str | os.PathLike) -> int:
    """Number of entries stored in the database."""
    env = open_lmdb(db_path)
    try:
        return int(env.stat()["entries"])
    finally:
        env.close()


def scan_lmdb_keys(db_path: str | os.PathLike) -> tuple[list[bytes], list[bytes]]:
    """List all keys in key order without reading any value.

    Returns ``(image_keys, metadata_keys)``; metadata keys are those shaped ``__name__``.
    """
    env = open_lmdb(db_path)
    try:
        with env.begin(write=False) as txn:
            keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
    finally:
        env.close()
    metadata = [k for k in keys if _METADATA_KEY.match(k)]
    images = [k for k in keys if not _METADATA_KEY.match(k)]
    return images, metadata


class _KeyFileUnpickler(pickle.Unpickler):
    """Unpickler that only builds plain containers/strings/numbers (and numpy arrays of them).

    A key file comes with a downloaded dataset; refusing arbitrary classes keeps loading it from
    running code.
    """

    _ALLOWED = {
        ("builtins", name) for name in ("list", "dict", "tuple", "set", "frozenset", "str", "bytes", "int")
    } | {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a key file holds only a list of keys")


def _as_key_bytes(key: object, key_file: Path) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode("utf-8")
    raise ValueError(f"{key_file}: keys must be strings, found {type(key).__name__} {key!r}")


def load_key_file(key_file: str | os.PathLike) -> list[bytes]:
    """Read the list of image keys of an LMDB release.

    ``*.pkl``: a pickled list of keys, or a dict whose ``"keys"`` entry is that list (LUPerson
    format). Any other extension: a text file with one key per line (blank lines ignored).
    """
    key_file = Path(key_file)
    if key_file.suffix == ".pkl":
        with key_file.open("rb") as handle:
            try:
                data = _KeyFileUnpickler(handle).load()
            except (pickle.UnpicklingError, EOFError, ValueError) as exc:
                raise ValueError(f"{key_file}: cannot read the key list: {exc}") from exc
        if isinstance(data, dict):
            if "keys" not in data:
                raise ValueError(f"{key_file}: a dict key file needs a 'keys' entry, found {sorted(map(str, data))}")
            data = data["keys"]
        if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
            raise ValueError(f"{key_file}: expected a list of keys, found {type(data).__name__}")
        return [_as_key_bytes(k, key_file) for k in data]
    with key_file.open("r", encoding="utf-8") as handle:
        return [line.strip().encode("utf-8") for line in handle if line.strip()]
