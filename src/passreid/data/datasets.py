"""Dataset readers: one registry, one item type, parsing per the published protocols.

One file of ~830 lines on purpose: the readers of the seven published layouts are 20-60 lines each and share
the folder search, the file listing and the error messages that draw the expected tree; split per data set,
each would import most of the rest.

Every reader lists files (never decodes images) and returns a ``ReIDDataset`` of ``ImageItem``s:

* ``train`` pids are relabelled to ``0..C-1`` in sorted order of the raw pids;
* ``query``/``gallery`` keep raw pids (``0`` = Market/Duke distractor, kept in the gallery);
* pid ``-1`` (Market "junk") is dropped from every split, and the table notes how many;
* camids are 0-based (``-1`` when unknown, e.g. unlabeled data);
* files are visited in sorted order, so the output is identical on every machine.

``root`` may be the dataset folder itself or its parent; the accepted folder names are listed per
reader (``DATASET_FOLDER_NAMES``). A missing folder raises ``DatasetLayoutError`` showing the expected
tree and the paths searched, and so does a split folder without images (naming it and the expected file
names); a file whose name or list line breaks the format raises
``DatasetFormatError`` naming it. Nothing is skipped silently: ignored non-image files are logged and
noted in the split table.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from passreid.config.errors import ConfigError

from .images import drop_damaged_images
from .lmdb_folder import KEY_FILE_NAME, lmdb_entry_count, load_key_file, make_lmdb_uri, scan_lmdb_keys

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".webp")
SPLITS = ("train", "query", "gallery")

# Market-1501 / DukeMTMC-reID naming: "<pid>_c<camera>..." with pid possibly -1 (junk).
_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
# Occluded-REID naming: "<pid>_<index>.tif" inside "<pid>/" sub-folders.
_OCCLUDED_REID_NAME = re.compile(r"^(\d+)_(\d+)$")


class ImageItem(NamedTuple):
    """One image: absolute path (or ``lmdb://<db>#<key>``), person id, 0-based camera id."""

    path: str
    pid: int
    camid: int


class DatasetLayoutError(FileNotFoundError):
    """The dataset folder (or a required file in it) is missing; the message shows the expected layout."""


class DatasetFormatError(ValueError):
    """A file name or list line does not follow the dataset's format; the message names it."""


@dataclass
class ReIDDataset:
    """Train/query/gallery item lists of one dataset, with the folder they were read from.

    ``unlabeled`` datasets (image folders, LUPerson) only have a train split with pid/camid -1.
    ``notes`` are human-readable facts about the reading (dropped junk, ignored files, protocol).
    """

    name: str
    root: str
    train: list[ImageItem]
    query: list[ImageItem]
    gallery: list[ImageItem]
    unlabeled: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def num_train_pids(self) -> int:
        """Number of training identities (0 for unlabeled or test-only sets)."""
        return _count_distinct(item.pid for item in self.train)

    @property
    def num_train_cams(self) -> int:
        """Number of training cameras (0 when unknown)."""
        return _count_distinct(item.camid for item in self.train)

    def split_stats(self) -> dict[str, dict[str, int]]:
        """``{"train": {"ids", "images", "cameras"}, "query": ..., "gallery": ...}``.

        Unlabeled datasets report only ``"train"``; unknown ids/cameras (-1) are not counted.
        """
        splits = ("train",) if self.unlabeled else SPLITS
        return {split: _stats(getattr(self, split)) for split in splits}

    def split_table(self) -> str:
        """Printable table of ids / images / cameras per split, followed by the notes."""
        stats = self.split_stats()
        header = ("split", "ids", "images", "cameras")
        rows = [(split, str(s["ids"]), str(s["images"]), str(s["cameras"])) for split, s in stats.items()]
        widths = [max(len(row[col]) for row in [header, *rows]) for col in range(4)]

        def fmt(row: tuple[str, ...]) -> str:
            cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
            return "  " + " | ".join(cells)

        lines = [f"dataset {self.name} ({self.root})", fmt(header),
                 "  " + "-+-".join("-" * w for w in widths), *map(fmt, rows)]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _count_distinct(values) -> int:
    return len({v for v in values if v != -1})


def _stats(items: list[ImageItem]) -> dict[str, int]:
    return {"ids": _count_distinct(i.pid for i in items), "images": len(items),
            "cameras": _count_distinct(i.camid for i in items)}


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

DatasetReader = Callable[..., ReIDDataset]
_REGISTRY: dict[str, DatasetReader] = {}


def register_dataset(name: str) -> Callable[[DatasetReader], DatasetReader]:
    """Decorator: register ``reader(root: Path, **options) -> ReIDDataset`` under ``name``."""

    def decorator(reader: DatasetReader) -> DatasetReader:
        if name in _REGISTRY:
            raise ValueError(f"dataset name {name!r} is already registered")
        _REGISTRY[name] = reader
        return reader

    return decorator


def list_datasets() -> list[str]:
    """Names accepted by ``build_dataset``, sorted."""
    return sorted(_REGISTRY)


def build_dataset(name: str, root: str | os.PathLike, *, skip_corrupt: bool = False, check_images: bool = True,
                  **options) -> ReIDDataset:
    """Read dataset ``name`` from ``root`` (the dataset folder or its parent), check every image file's first
    and last bytes, and log its split table.

    A damaged file raises ``DamagedImagesError`` listing them (see ``passreid.data.images``: what is checked,
    what it costs); with ``skip_corrupt`` they are left out of every split, logged by name and counted in the
    notes. ``check_images=False`` leaves the check out (huge unlabeled folders). Options are reader-specific (e.g. ``msmt17``: ``version="v1"|"v2"`` (required),
    ``train_split="trainval"|"train"``; ``image_folder``: ``file_list=``; ``luperson_lmdb``:
    ``keys_file=``). Unknown names or options raise ``ValueError`` listing the valid ones.
    """
    reader = _REGISTRY.get(name)
    if reader is None:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}")
    _check_options(name, reader, options)
    dataset = reader(Path(os.path.abspath(os.path.expanduser(os.fspath(root)))), **options)
    if check_images:
        dataset = _without_damaged_images(dataset, skip_corrupt)
    logger.info("\n%s", dataset.split_table())
    return dataset


def reader_options(name: str, data: Any) -> dict:
    """The reader options of data set ``name`` taken from a stage's ``data`` config section: MSMT17's
    ``version`` (never guessed: a missing one is a ``ConfigError``) and ``train_split``; none for the others."""
    if name != "msmt17":
        return {}
    if not data.version:
        raise ConfigError("config key 'data.version': msmt17 needs v1 or v2 (it is never guessed)")
    return {"version": data.version, "train_split": data.train_split}


def check_data_root(root: str, key: str = "data.root") -> str:
    """``root``, a data set folder; an empty root or a ``generated:`` name of older demos is a ``ConfigError``."""
    if not root:
        raise ConfigError(f"config key '{key}' is empty: pass --data-root DIR (or {key}=DIR); the demo's generated "
                          "world is rendered with `python -m passreid.demo --out DIR`")
    if root.startswith("generated:"):
        subset = root.split(":", 1)[1]
        raise ConfigError(f"config key '{key}': '{root}' is no longer rendered by the stages, which read folders: "
                          f"render the demo world with `python -m passreid.demo --out DIR` and pass "
                          f"{key}=DIR/world/{subset}")
    return root


def _without_damaged_images(dataset: ReIDDataset, skip_corrupt: bool) -> ReIDDataset:
    start = time.perf_counter()
    paths = [item.path for split in SPLITS for item in getattr(dataset, split)]
    damaged = drop_damaged_images(paths, f"{dataset.name} ({dataset.root})", skip_corrupt)
    logger.info("%s: checked %d image files in %.1f s", dataset.name, len(paths), time.perf_counter() - start)
    if not damaged:
        return dataset
    splits = {split: [item for item in getattr(dataset, split) if item.path not in damaged] for split in SPLITS}
    note = f"left out {len(damaged)} damaged image file(s) (skip_corrupt; each is named in the log)"
    return ReIDDataset(dataset.name, dataset.root, **splits, unlabeled=dataset.unlabeled, notes=[*dataset.notes, note])


def _check_options(name: str, reader: DatasetReader, options: dict) -> None:
    params = inspect.signature(reader).parameters
    accepted = [p for p in params if p != "root"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"dataset {name!r} does not accept option(s) {', '.join(unknown)}; "
                         f"accepted options: {', '.join(accepted) or 'none'}")


# ---------------------------------------------------------------------------------------------
# Locating the dataset folder
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FolderLayout:
    """What a dataset folder is called and must contain, and the tree shown when it is not found."""

    dataset: str
    folder_names: tuple[str, ...]   # accepted names below the given root ("" = root itself only)
    required: tuple[str, ...]       # entries that must exist inside the dataset folder
    tree: str                       # expected layout, printed in errors

    def missing_entries(self, folder: Path) -> list[str]:
        return [entry for entry in self.required if not (folder / entry).exists()]


def _layout_error(layout: FolderLayout, root: Path, searched: list[str], extra: str = "") -> DatasetLayoutError:
    if layout.folder_names:
        names = ", ".join(f"{n}/" for n in layout.folder_names)
        accepted = f"accepted folder names under root: {names}; root may also be the dataset folder itself"
    else:
        accepted = "root must be the dataset folder itself (any name)"
    lines = [f"{layout.dataset}: dataset folder not found for root {root}"]
    if extra:
        lines.append(extra)
    lines += ["searched:", *[f"  {s}" for s in searched], accepted, "expected layout:", layout.tree.rstrip()]
    return DatasetLayoutError("\n".join(lines))


def _describe(folder: Path, layout: FolderLayout) -> str:
    if not folder.exists():
        return f"{folder}  (does not exist)"
    if not folder.is_dir():
        return f"{folder}  (not a directory)"
    return f"{folder}  (missing: {', '.join(layout.missing_entries(folder))})"


def _sibling_hint(root: Path, layout: FolderLayout) -> str:
    """Name a sub-folder of root that has the right content under another name, if any."""
    if not root.is_dir():
        return ""
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())[:1000]
    except OSError:
        return ""
    for child in children:
        if not layout.missing_entries(child):
            return f"hint: {child} has this layout; pass it as root"
    return ""


def resolve_dataset_dir(root: Path, layout: FolderLayout) -> Path:
    """Return ``root`` or ``root/<accepted name>``, whichever holds the required entries."""
    candidates = [root] + [root / name for name in layout.folder_names]
    for folder in candidates:
        if folder.is_dir() and not layout.missing_entries(folder):
            return folder
    raise _layout_error(layout, root, [_describe(f, layout) for f in candidates], _sibling_hint(root, layout))


# ---------------------------------------------------------------------------------------------
# Listing files
# ---------------------------------------------------------------------------------------------

def is_image_file(name: str) -> bool:
    """True for file names with an image extension (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(folder: Path, recursive: bool = False) -> tuple[list[str], list[str]]:
    """Sorted absolute image paths under ``folder`` and the sorted non-image entries found there.

    Recursive listing follows symbolic links to folders (each real folder is visited once).
    """
    images: list[str] = []
    others: list[str] = []
    visited: set[str] = set()
    pending = [os.fspath(folder)]
    while pending:
        current = pending.pop()
        real = os.path.realpath(current)
        if real in visited:
            continue
        visited.add(real)
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.is_dir():
                    (pending if recursive else others).append(entry.path)
                elif is_image_file(entry.name):
                    images.append(entry.path)
                else:
                    others.append(entry.path)
    return sorted(images), sorted(others)


def _note_ignored(notes: list[str], folder: Path, others: list[str]) -> None:
    if not others:
        return
    shown = ", ".join(os.path.basename(p) for p in others[:5]) + (", ..." if len(others) > 5 else "")
    message = f"{folder}: ignored {len(others)} non-image entr{'y' if len(others) == 1 else 'ies'} ({shown})"
    logger.warning(message)
    notes.append(message)


def relabel_train(items: list[ImageItem]) -> list[ImageItem]:
    """Map train pids to ``0..C-1`` in sorted order of the raw pids."""
    label_of = {pid: label for label, pid in enumerate(sorted({item.pid for item in items}))}
    return [item._replace(pid=label_of[item.pid]) for item in items]


# ---------------------------------------------------------------------------------------------
# Market-1501 naming (Market-1501, DukeMTMC-reID, Occluded-Duke, any folder in that naming)
# ---------------------------------------------------------------------------------------------

MARKET_SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def _market_tree(folder_name: str | None, example: str) -> str:
    top = f"<root>/{folder_name}/" if folder_name else "<root>/   (the folder itself, any name)"
    return (f"{top}\n"
            f"  bounding_box_train/{example}   training images\n"
            f"  query/{example}                query images\n"
            f"  bounding_box_test/{example}    gallery images\n"
            f"  file name: <pid>_c<camera>...  (pid -1 = junk, dropped; pid 0 = distractor, kept)")


def parse_market_name(file_name: str) -> tuple[int, int] | None:
    """``(pid, camera)`` of a Market-1501 / DukeMTMC-reID file name ``<pid>_c<camera>...``, else ``None``.

    The camera is 1-based as written (``c1`` -> 1); pid -1 marks junk. Only the name is parsed
    (pass a base name, not a path); callers check the ranges they expect.
    """
    match = _MARKET_NAME.match(file_name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def require_images(folder: Path, paths: list[str], others: list[str], expected: str) -> None:
    """A split folder without images is an error naming it and what it should hold (an empty split would
    otherwise surface later as a 0-image table or an unexplained "no train split")."""
    if paths:
        return
    found = (f"it holds only {len(others)} other entr{'y' if len(others) == 1 else 'ies'} "
             f"({', '.join(os.path.basename(p) for p in others[:5])}{', ...' if len(others) > 5 else ''})"
             if others else "it is empty")
    raise DatasetLayoutError(f"{folder}: no images in this split folder ({found}); expected {expected}, "
                             f"extensions {' '.join(IMAGE_EXTENSIONS)}")


MARKET_FILE_PATTERN = "files named '<pid>_c<camera>...' (e.g. 0002_c1s1_000451_03.jpg)"


def parse_market_folder(folder: Path, max_camera: int | None, notes: list[str]) -> list[ImageItem]:
    """Items of one split folder in Market-1501 naming; junk (pid -1) dropped and noted. A folder without
    images, or with junk images only, raises ``DatasetLayoutError`` naming it."""
    paths, others = list_image_files(folder)
    require_images(folder, paths, others, MARKET_FILE_PATTERN)
    _note_ignored(notes, folder, others)
    items, junk = [], 0
    for path in paths:
        name = os.path.basename(path)
        parsed = parse_market_name(name)
        if parsed is None:
            raise DatasetFormatError(f"{path}: file name does not follow Market-1501 naming: expected "
                                     f"{MARKET_FILE_PATTERN}")
        pid, camera = parsed
        if pid < -1:
            raise DatasetFormatError(f"{path}: pid {pid} is invalid (expected -1 for junk or >= 0)")
        if camera < 1 or (max_camera is not None and camera > max_camera):
            expected = f"1..{max_camera}" if max_camera is not None else ">= 1"
            raise DatasetFormatError(f"{path}: camera c{camera} is outside the expected range {expected}")
        if pid == -1:
            junk += 1
            continue
        items.append(ImageItem(path, pid, camera - 1))
    if junk and not items:
        raise DatasetLayoutError(f"{folder}: all {junk} images are junk (pid -1), so the split is empty; expected "
                                 f"{MARKET_FILE_PATTERN} with pid >= 0")
    if junk:
        notes.append(f"{folder.name}: dropped {junk} junk image(s) with pid -1")
    return items


def read_market_style(name: str, root: Path, layout: FolderLayout, max_camera: int | None,
                      official: dict | None = None) -> ReIDDataset:
    """Read a folder with bounding_box_train/query/bounding_box_test in Market-1501 naming."""
    folder = resolve_dataset_dir(root, layout)
    notes: list[str] = []
    splits = {split: parse_market_folder(folder / sub, max_camera, notes)
              for split, sub in MARKET_SPLIT_FOLDERS.items()}
    dataset = ReIDDataset(name, str(folder), relabel_train(splits["train"]), splits["query"],
                          splits["gallery"], notes=notes)
    _note_official_sizes(dataset, official)
    return dataset


# The split sizes each data set's release states (the statistics its published loaders print, e.g. TransReID:
# datasets/market1501.py): split -> (ids, images, cameras or None).
OFFICIAL_SPLIT_SIZES: dict[str, dict[str, tuple[int, int, int | None]]] = {
    "market1501": {"train": (751, 12936, 6), "query": (750, 3368, 6), "gallery": (751, 15913, 6)},
    "dukemtmcreid": {"train": (702, 16522, 8), "query": (702, 2228, 8), "gallery": (1110, 17661, 8)},
    "occluded_duke": {"train": (702, 15618, None), "query": (519, 2210, None), "gallery": (1110, 17661, None)},
    "occluded_reid": {"train": (0, 0, 0), "query": (200, 1000, 1), "gallery": (200, 1000, 1)},
    "occluded_duke_tsd": {"train": (702, 15618, None), "query": (517, 2538, None), "gallery": (1110, 18001, None)},
    "msmt17/trainval": {"train": (1041, 32621, None), "query": (3060, 11659, None),
                        "gallery": (3060, 82161, None)},
    "msmt17/train": {"train": (1041, 30248, None), "query": (3060, 11659, None),
                     "gallery": (3060, 82161, None)},
}


def _note_official_sizes(dataset: ReIDDataset, official: dict | None) -> None:
    """Say whether the split sizes equal the published release (they differ for generated data)."""
    if official is None:
        return
    stats = dataset.split_stats()
    mismatches = []
    for split, (ids, images, cameras) in official.items():
        got = stats[split]
        if (got["ids"], got["images"]) != (ids, images) or (cameras is not None and got["cameras"] != cameras):
            cams = f"/{cameras} cameras" if cameras is not None else ""
            mismatches.append(f"{split} {ids} ids/{images} images{cams}")
    if mismatches:
        dataset.notes.append("split sizes differ from the published release (published: "
                             + "; ".join(mismatches) + ")")
    else:
        dataset.notes.append("split sizes match the published release")


DATASET_FOLDER_NAMES: dict[str, tuple[str, ...]] = {
    "market1501": ("Market-1501-v15.09.15", "market1501", "Market-1501", "Market1501"),
    "dukemtmcreid": ("DukeMTMC-reID", "dukemtmcreid", "dukemtmc-reid/DukeMTMC-reID", "dukemtmc-reid"),
    "occluded_duke": ("Occluded_Duke", "occluded_duke", "Occluded-Duke", "OccludedDuke"),
    "occluded_reid": ("Occluded_REID", "occluded_reid", "Occluded-REID", "OccludedREID"),
    "msmt17/v1": ("MSMT17_V1", "MSMT17", "msmt17", "msmt17/MSMT17_V1"),
    "msmt17/v2": ("MSMT17_V2", "msmt17_v2", "msmt17/MSMT17_V2"),
    "market_naming": (),
    "image_folder": (),
    "luperson_lmdb": (),
}


def _market_layout(name: str, example: str) -> FolderLayout:
    folder_names = DATASET_FOLDER_NAMES[name]
    return FolderLayout(name, folder_names, tuple(MARKET_SPLIT_FOLDERS.values()),
                        _market_tree(folder_names[0] if folder_names else None, example))


@register_dataset("market1501")
def read_market1501(root: Path) -> ReIDDataset:
    """Market-1501: 6 cameras; train 751 ids / 12,936, query 750 / 3,368, gallery 751 / 15,913."""
    return read_market_style("market1501", root, _market_layout("market1501", "0002_c1s1_000451_03.jpg"),
                             max_camera=6, official=OFFICIAL_SPLIT_SIZES["market1501"])


@register_dataset("dukemtmcreid")
def read_dukemtmcreid(root: Path) -> ReIDDataset:
    """DukeMTMC-reID: 8 cameras; train 702 / 16,522, query 702 / 2,228, gallery 1,110 / 17,661."""
    return read_market_style("dukemtmcreid", root, _market_layout("dukemtmcreid", "0001_c2_f0046182.jpg"),
                             max_camera=8, official=OFFICIAL_SPLIT_SIZES["dukemtmcreid"])


@register_dataset("occluded_duke")
def read_occluded_duke(root: Path) -> ReIDDataset:
    """Occluded-Duke (re-split of Duke): train 702 / 15,618, query 519 / 2,210, gallery 1,110 / 17,661."""
    return read_market_style("occluded_duke", root, _market_layout("occluded_duke", "0001_c2_f0046182.jpg"),
                             max_camera=8, official=OFFICIAL_SPLIT_SIZES["occluded_duke"])


# TSD's holistic-query split of Occluded-Duke (TSD: new_query.txt / new_gallery.txt at the repository root, read by
# datasets/occ_duke_new.py): list files in the dataset folder.
TSD_QUERY_LIST, TSD_GALLERY_LIST = "new_query.txt", "new_gallery.txt"
TSD_SPLIT_TREE = """<root>/Occluded_Duke/
  bounding_box_train/0001_c2_f0046182.jpg   training images (as occluded_duke)
  query/ , bounding_box_test/               the images the lists point to
  new_query.txt     one '<split folder>/<image>' per line (holistic queries)
  new_gallery.txt   one '<split folder>/<image>,<occlusion label 0-3>' per line
  (the two list files are published at the root of the TSD repository, hh23333/TSD; copy them here)"""


def _tsd_list_lines(list_file: Path) -> list[tuple[int, str]]:
    lines = list_file.read_text().splitlines()
    return [(number, line.strip()) for number, line in enumerate(lines, 1) if line.strip()]


def _tsd_item(folder: Path, list_file: Path, number: int, relative: str) -> ImageItem:
    path = folder / relative
    match = _MARKET_NAME.match(os.path.basename(relative))
    if match is None or int(match.group(1)) < 0:
        raise DatasetFormatError(f"{list_file}:{number}: '{relative}' is not '<split folder>/<pid>_c<camera>...'")
    if not path.is_file():
        raise DatasetFormatError(f"{list_file}:{number}: image {path} does not exist")
    camera = int(match.group(2))
    if not 1 <= camera <= 8:
        raise DatasetFormatError(f"{list_file}:{number}: camera c{camera} is outside 1..8")
    return ImageItem(str(path), int(match.group(1)), camera - 1)


def read_tsd_gallery_labels(folder: str | os.PathLike) -> dict[str, int]:
    """``{absolute image path: occlusion label}`` from ``<folder>/new_gallery.txt`` (labels 0-3, TSD: utils/metrics_new.py)."""
    folder = Path(folder)
    list_file = folder / TSD_GALLERY_LIST
    if not list_file.is_file():
        raise DatasetLayoutError(f"TSD gallery list {list_file} not found; expected layout:\n{TSD_SPLIT_TREE}")
    labels: dict[str, int] = {}
    for number, line in _tsd_list_lines(list_file):
        relative, _, label = line.partition(",")
        if not label.strip().isdigit() or int(label) not in (0, 1, 2, 3):
            raise DatasetFormatError(f"{list_file}:{number}: expected '<path>,<label 0-3>', got {line!r}")
        labels[str(folder / relative.strip())] = int(label)
    return labels


def occlusion_labels_for(items: list[ImageItem], labels: dict[str, int]) -> list[int]:
    """The occlusion label of every item (e.g. a possibly sub-sampled gallery); a missing one is an error."""
    missing = [item.path for item in items if item.path not in labels]
    if missing:
        raise DatasetFormatError(f"{len(missing)} gallery image(s) have no occlusion label in {TSD_GALLERY_LIST}, "
                                 f"e.g. {missing[0]}")
    return [labels[item.path] for item in items]


@register_dataset("occluded_duke_tsd")
def read_occluded_duke_tsd(root: Path) -> ReIDDataset:
    """TSD's holistic-query Occluded-Duke: train = Occluded-Duke train, query = ``new_query.txt`` (2,538 holistic
    images / 517 ids), gallery = ``new_gallery.txt`` (18,001 images / 1,110 ids, each with an occlusion label read
    by :func:`read_tsd_gallery_labels`). Evaluate with :mod:`passreid.eval.occlusion_variants` (ALL/NPO/NTP)."""
    layout = FolderLayout("occluded_duke_tsd", DATASET_FOLDER_NAMES["occluded_duke"],
                          (*MARKET_SPLIT_FOLDERS.values(), TSD_QUERY_LIST, TSD_GALLERY_LIST), TSD_SPLIT_TREE)
    folder = resolve_dataset_dir(root, layout)
    notes = ["TSD holistic-query split (new_query.txt / new_gallery.txt); evaluate with the ALL / NPO / NTP "
             "variants (passreid.eval.occlusion_variants), not the standard protocol"]
    train = relabel_train(parse_market_folder(folder / MARKET_SPLIT_FOLDERS["train"], 8, notes))
    query_file, gallery_file = folder / TSD_QUERY_LIST, folder / TSD_GALLERY_LIST
    query = [_tsd_item(folder, query_file, number, line) for number, line in _tsd_list_lines(query_file)]
    labels = read_tsd_gallery_labels(folder)
    gallery = [_tsd_item(folder, gallery_file, number, line.partition(",")[0].strip())
               for number, line in _tsd_list_lines(gallery_file)]
    dataset = ReIDDataset("occluded_duke_tsd", str(folder), train, query, gallery, notes=notes)
    counts = {label: sum(value == label for value in labels.values()) for label in range(4)}
    notes.append("gallery occlusion labels 0/1/2/3: " + "/".join(str(counts[label]) for label in range(4)))
    _note_official_sizes(dataset, OFFICIAL_SPLIT_SIZES["occluded_duke_tsd"])
    return dataset


@register_dataset("market_naming")
def read_market_naming(root: Path) -> ReIDDataset:
    """Any folder (given as root itself) with bounding_box_train/query/bounding_box_test in Market naming."""
    return read_market_style("market_naming", root, _market_layout("market_naming", "0002_c1s1_000451_03.jpg"),
                             max_camera=None)


# ---------------------------------------------------------------------------------------------
# Occluded-REID (test only)
# ---------------------------------------------------------------------------------------------

# DPM's Rename.py writes the whole-body gallery as camera c3 (query c1): with SIE, a Market-trained model embeds
# them as Market cameras 0 and 2.
OCCLUDED_REID_GALLERY_CAMID = 2

OCCLUDED_REID_TREE = """<root>/Occluded_REID/
  occluded_body_images/001/001_01.tif   query   (occluded), camid 0
  whole_body_images/001/001_01.tif      gallery (whole body), camid 2
  file name: <pid>_<index>.tif inside the <pid>/ folder; 200 ids x 5 images per folder"""


def _parse_occluded_reid_folder(folder: Path, camid: int, notes: list[str]) -> list[ImageItem]:
    paths, others = list_image_files(folder, recursive=True)
    require_images(folder, paths, others, "'<pid>/<pid>_<index>.tif' files (e.g. 001/001_01.tif)")
    _note_ignored(notes, folder, others)
    items = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        match = _OCCLUDED_REID_NAME.match(stem)
        if match is None:
            raise DatasetFormatError(f"{path}: file name does not follow Occluded-REID naming "
                                     f"'<pid>_<index>.tif' (e.g. 001_01.tif)")
        pid = int(match.group(1))
        parent = os.path.basename(os.path.dirname(path))
        if parent.isdigit() and int(parent) != pid:
            raise DatasetFormatError(f"{path}: pid {pid} in the file name differs from its folder {parent}/")
        items.append(ImageItem(path, pid, camid))
    return items


@register_dataset("occluded_reid")
def read_occluded_reid(root: Path) -> ReIDDataset:
    """Occluded-REID: query = occluded_body_images (camid 0), gallery = whole_body_images (camid 2).

    No training split (train is empty): the published protocol (BPBReID, DPM, HOReID) trains on
    Market-1501 and tests here, occluded -> whole-body. The camera ids are those of DPM's Rename.py
    (query c1, gallery c3, i.e. Market cameras 0 and 2), the only published code that embeds them (SIE);
    rank metrics only need the two to differ.
    """
    layout = FolderLayout("occluded_reid", DATASET_FOLDER_NAMES["occluded_reid"],
                          ("occluded_body_images", "whole_body_images"), OCCLUDED_REID_TREE)
    folder = resolve_dataset_dir(root, layout)
    notes = ["no train split: Occluded-REID is test only; train on market1501 "
             "(query = occluded_body_images camid 0, gallery = whole_body_images camid 2)"]
    query = _parse_occluded_reid_folder(folder / "occluded_body_images", 0, notes)
    gallery = _parse_occluded_reid_folder(folder / "whole_body_images", OCCLUDED_REID_GALLERY_CAMID, notes)
    dataset = ReIDDataset("occluded_reid", str(folder), [], query, gallery, notes=notes)
    _note_official_sizes(dataset, OFFICIAL_SPLIT_SIZES["occluded_reid"])
    return dataset


# ---------------------------------------------------------------------------------------------
# MSMT17 (V1 and V2, list files)
# ---------------------------------------------------------------------------------------------

MSMT17_IMAGE_FOLDERS = {"v1": ("train", "test"), "v2": ("mask_train_v2", "mask_test_v2")}
MSMT17_NUM_CAMERAS = 15
MSMT17_TRAIN_SPLITS = {"train": ("list_train.txt",), "trainval": ("list_train.txt", "list_val.txt")}


def _msmt17_tree(version: str) -> str:
    train_dir, test_dir = MSMT17_IMAGE_FOLDERS[version]
    folder = DATASET_FOLDER_NAMES[f"msmt17/{version}"][0]
    return (f"<root>/{folder}/            (MSMT17 {version.upper()})\n"
            f"  {train_dir}/0000/0000_000_01_0303morning_0015_0.jpg\n"
            f"  {test_dir}/0000/0000_000_01_0303morning_0008_0.jpg\n"
            f"  list_train.txt   lines '<pid folder>/<file> <pid>', images under {train_dir}/\n"
            f"  list_val.txt     (used by train_split='trainval')\n"
            f"  list_query.txt   images under {test_dir}/\n"
            f"  list_gallery.txt images under {test_dir}/\n"
            f"  camera = 3rd '_' field of the file name (1..15)")


def _msmt17_version_of(folder: Path) -> str | None:
    for version, (train_dir, test_dir) in MSMT17_IMAGE_FOLDERS.items():
        if (folder / train_dir).is_dir() and (folder / test_dir).is_dir():
            return version
    return None


def _find_msmt17(root: Path, version: str) -> Path:
    """The folder of the requested release; the other release found instead is an error saying so."""
    names = DATASET_FOLDER_NAMES["msmt17/v1"] + DATASET_FOLDER_NAMES["msmt17/v2"]
    candidates = [root] + [root / name for name in names]
    found_other = []
    for folder in candidates:
        found = _msmt17_version_of(folder)
        if found == version:
            return folder
        if found is not None:
            found_other.append(folder)
    layout = FolderLayout("msmt17", DATASET_FOLDER_NAMES[f"msmt17/{version}"],
                          MSMT17_IMAGE_FOLDERS[version], _msmt17_tree(version))
    if found_other:
        other = "v2" if version == "v1" else "v1"
        other_dirs = "/, ".join(MSMT17_IMAGE_FOLDERS[other])
        raise DatasetLayoutError(
            f"msmt17: version={version!r} was requested, but the MSMT17 folder found at {found_other[0]} is the "
            f"{other.upper()} release ({other_dirs}/); pass version={other!r} to use it, or point root at an "
            f"MSMT17 {version.upper()} folder\nexpected layout for {version}:\n{_msmt17_tree(version)}")
    raise _layout_error(layout, root, [_describe(f, layout) for f in candidates], _sibling_hint(root, layout))


def _existing_files(folder: Path) -> set[str]:
    """Relative paths ('<pid>/<file>') of all files under an MSMT17 image folder."""
    found = set()
    for dirpath, _, filenames in os.walk(folder):
        rel_dir = os.path.relpath(dirpath, folder)
        for filename in filenames:
            found.add(filename if rel_dir == "." else f"{rel_dir}/{filename}")
    return found


def _parse_msmt17_list(list_file: Path, image_dir: Path, existing: set[str]) -> list[ImageItem]:
    items, missing = [], []
    with list_file.open("r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{list_file}:{line_number}"
            if len(fields) != 2 or not fields[1].isdigit():
                raise DatasetFormatError(f"{where}: expected '<relative path> <pid>', got {line.strip()!r}")
            rel_path, pid = fields[0], int(fields[1])
            name_fields = os.path.basename(rel_path).split("_")
            if len(name_fields) < 4 or not name_fields[2].isdigit():
                raise DatasetFormatError(f"{where}: file name {rel_path!r} does not follow MSMT17 naming "
                                         f"'<pid>_<index>_<camera>_<time>_...jpg'")
            camera = int(name_fields[2])
            if not 1 <= camera <= MSMT17_NUM_CAMERAS:
                raise DatasetFormatError(f"{where}: camera {camera} outside 1..{MSMT17_NUM_CAMERAS}")
            if rel_path not in existing:
                missing.append(rel_path)
            items.append(ImageItem(str(image_dir / rel_path), pid, camera - 1))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DatasetLayoutError(f"{list_file}: {len(missing)} listed image(s) not found under {image_dir}: {shown}")
    return items


def _check_contiguous(items: list[ImageItem], list_names: tuple[str, ...]) -> None:
    pids = sorted({item.pid for item in items})
    if pids != list(range(len(pids))):
        gaps = sorted(set(range(pids[-1] + 1)) - set(pids))[:5] if pids else []
        raise DatasetFormatError(f"msmt17: train pids in {' + '.join(list_names)} are not contiguous 0..N-1 "
                                 f"({len(pids)} ids, max {pids[-1] if pids else None}, missing e.g. {gaps}); "
                                 f"the list files look damaged")


@register_dataset("msmt17")
def read_msmt17(root: Path, version: str | None = None, train_split: str = "trainval") -> ReIDDataset:
    """MSMT17 from its list files. ``version`` ("v1"|"v2") is required and checked against the folder.

    ``train_split="trainval"`` (default; TransReID/PASS: list_train + list_val, 1,041 ids / 32,621
    images) or ``"train"`` (torchreid: list_train only, 30,248 images). Test: query 3,060 / 11,659,
    gallery 3,060 / 82,161. PASS issue #1 reports V2 (blurred faces) ~1.7 mAP below V1.
    """
    if version is None:
        raise ValueError("msmt17 needs version='v1' (MSMT17/ or MSMT17_V1/ with train/, test/) or "
                         "version='v2' (MSMT17_V2/ with mask_train_v2/, mask_test_v2/); it is never guessed")
    version = version.lower()
    if version not in MSMT17_IMAGE_FOLDERS:
        raise ValueError(f"msmt17 version must be 'v1' or 'v2', got {version!r}")
    if train_split not in MSMT17_TRAIN_SPLITS:
        raise ValueError(f"msmt17 train_split must be one of {sorted(MSMT17_TRAIN_SPLITS)}, got {train_split!r}")
    folder = _find_msmt17(root, version)
    list_names = MSMT17_TRAIN_SPLITS[train_split]
    needed = (*list_names, "list_query.txt", "list_gallery.txt")
    missing_lists = [n for n in needed if not (folder / n).is_file()]
    if missing_lists:
        raise DatasetLayoutError(f"msmt17: {folder} lacks {', '.join(missing_lists)}\n"
                                 f"expected layout:\n{_msmt17_tree(version)}")
    train_dir, test_dir = (folder / d for d in MSMT17_IMAGE_FOLDERS[version])
    train_files, test_files = _existing_files(train_dir), _existing_files(test_dir)
    train = [item for name in list_names for item in _parse_msmt17_list(folder / name, train_dir, train_files)]
    _check_contiguous(train, list_names)
    query = _parse_msmt17_list(folder / "list_query.txt", test_dir, test_files)
    gallery = _parse_msmt17_list(folder / "list_gallery.txt", test_dir, test_files)
    notes = [f"MSMT17 {version.upper()}, train split {train_split!r} ({' + '.join(list_names)})"]
    dataset = ReIDDataset("msmt17", str(folder), relabel_train(train), query, gallery, notes=notes)
    _note_official_sizes(dataset, OFFICIAL_SPLIT_SIZES[f"msmt17/{train_split}"])
    return dataset


# ---------------------------------------------------------------------------------------------
# Unlabeled data: image folders and the LUPerson LMDB release
# ---------------------------------------------------------------------------------------------

IMAGE_FOLDER_TREE = """<root>/                 any folder of images, e.g. LUPerson decoded as LUP/images/*.jpg
  images/34_01_0341_00001865.jpg    scanned recursively (extensions: """ + " ".join(IMAGE_EXTENSIONS) + """)
or file_list=<text file>: one image path per line, relative to <root> (or absolute)"""


def _read_file_list(root: Path, file_list: str | os.PathLike) -> list[str]:
    list_path = Path(file_list)
    if not list_path.is_absolute() and not list_path.exists():
        list_path = root / list_path
    if not list_path.is_file():
        raise DatasetLayoutError(f"image_folder: file list {file_list} not found (also tried {list_path})")
    paths, missing = [], []
    with list_path.open("r", encoding="utf-8") as handle:
        for line in handle:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(root, entry))
            (paths if os.path.isfile(path) else missing).append(path)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DatasetLayoutError(f"image_folder: {len(missing)} file(s) listed in {list_path} do not exist: {shown}")
    return paths


@register_dataset("image_folder")
def read_image_folder(root: Path, file_list: str | None = None) -> ReIDDataset:
    """Unlabeled images (pid -1, camid -1, train only): a recursive scan of ``root``, sorted, or the
    paths listed in ``file_list`` (relative to ``root``), in file order."""
    if not root.is_dir():
        raise DatasetLayoutError(f"image_folder: root {root} is not a directory\nexpected layout:\n{IMAGE_FOLDER_TREE}")
    notes: list[str] = []
    if file_list is not None:
        paths = _read_file_list(root, file_list)
        notes.append(f"images listed in {file_list}")
    else:
        paths, others = list_image_files(root, recursive=True)
        _note_ignored(notes, root, others)
    if not paths:
        raise DatasetLayoutError(f"image_folder: no images found under {root}\nexpected layout:\n{IMAGE_FOLDER_TREE}")
    train = [ImageItem(path, -1, -1) for path in paths]
    return ReIDDataset("image_folder", str(root), train, [], [], unlabeled=True, notes=notes)


LUPERSON_LMDB_TREE = f"""<root>/                       LUPerson LMDB release (DengpanFu/LUPerson LUP/convert_lmdb.py)
  lmdb/data.mdb               LMDB: key = ASCII image key (e.g. 00_00_0000_00000000), value = encoded JPEG bytes
  lmdb/lock.mdb
  {KEY_FILE_NAME}                    pickled list of keys, or dict with a 'keys' list (optional: without it
                              every LMDB key is listed by a key-only scan)
root may also be the LMDB folder itself (data.mdb inside; {KEY_FILE_NAME} beside it or in its parent)"""


def _locate_lmdb(root: Path, keys_file: str | None) -> tuple[Path, Path | None]:
    """(LMDB folder, key file or None) for a release folder or the LMDB folder itself."""
    if (root / "lmdb" / "data.mdb").is_file():
        db_dir, key_candidates = root / "lmdb", [root / KEY_FILE_NAME, root / "lmdb" / KEY_FILE_NAME]
    elif (root / "data.mdb").is_file():
        db_dir, key_candidates = root, [root / KEY_FILE_NAME, root.parent / KEY_FILE_NAME]
    else:
        raise DatasetLayoutError(f"luperson_lmdb: no LMDB found for root {root}\nsearched:\n"
                                 f"  {root / 'lmdb' / 'data.mdb'}  (missing)\n  {root / 'data.mdb'}  (missing)\n"
                                 f"expected layout:\n{LUPERSON_LMDB_TREE}")
    if keys_file is not None:
        key_path = Path(keys_file)
        if not key_path.is_file():
            raise DatasetLayoutError(f"luperson_lmdb: keys_file {keys_file} not found\n"
                                     f"expected layout:\n{LUPERSON_LMDB_TREE}")
        return db_dir, key_path
    return db_dir, next((p for p in key_candidates if p.is_file()), None)


@register_dataset("luperson_lmdb")
def read_luperson_lmdb(root: Path, keys_file: str | None = None) -> ReIDDataset:
    """Unlabeled LUPerson LMDB (train only, pid/camid -1); items are ``lmdb://`` addresses decoded lazily.

    Keys come from ``keys.pkl`` (or ``keys_file=``); without one, the LMDB keys are scanned
    (values untouched). Any pids stored in the key file are not used.
    """
    db_dir, key_path = _locate_lmdb(root, keys_file)
    notes: list[str] = []
    entries = lmdb_entry_count(db_dir)
    if key_path is not None:
        try:
            keys = load_key_file(key_path)
        except ValueError as error:  # a damaged or foreign key file: the user's input, named in the message
            raise DatasetFormatError(str(error)) from error
        notes.append(f"keys from {key_path}")
        if len(keys) != entries:
            message = f"{key_path} lists {len(keys)} keys but {db_dir} holds {entries} entries"
            logger.warning(message)
            notes.append(message)
    else:
        keys, metadata = scan_lmdb_keys(db_dir)
        notes.append(f"no {KEY_FILE_NAME} found: listed the {len(keys)} keys of {db_dir}")
        if metadata:
            notes.append(f"ignored {len(metadata)} metadata entr{'y' if len(metadata) == 1 else 'ies'} "
                         f"({', '.join(k.decode('utf-8', 'replace') for k in metadata[:5])})")
    if not keys:
        raise DatasetLayoutError(f"luperson_lmdb: {db_dir} holds no image keys\nexpected layout:\n{LUPERSON_LMDB_TREE}")
    train = [ImageItem(make_lmdb_uri(db_dir, key), -1, -1) for key in keys]
    return ReIDDataset("luperson_lmdb", str(db_dir), train, [], [], unlabeled=True, notes=notes)
