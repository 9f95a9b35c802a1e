"""Human-parsing masks in BPBReID's published format: read, write, group into body parts, pair with images.

On disk (bpbreid: ``torchreid/data/datasets/dataset.py``, ``infer_masks_path``):
one ``.npy`` file per image, a float array ``(36, h, w)`` in [0, 1] at low resolution: the 17 PifPaf keypoint
confidence fields (COCO order, :data:`PIFPAF_KEYPOINTS`) followed by the 19 PifPaf joint (PAF) fields
(:data:`PIFPAF_JOINTS`). The file lives in a ``masks`` folder that mirrors the dataset::

    <dataset>/masks/<masks_dir>/<split folder>/<image stem><suffix>
    e.g. Market-1501-v15.09.15/masks/pifpaf_maskrcnn_filtering/bounding_box_train/0002_c1s1_000451_03.npy

``suffix`` is ``.npy`` for Market-1501 / Occluded-REID and ``.jpg.confidence_fields.npy`` for Occluded-Duke
(:data:`PUBLISHED_MASK_SUFFIXES`). Training targets (bpbreid: ``torchreid/data/masks_transforms/``): group the 36 fields into K body parts by a
channel-wise **max** (:data:`PART_GROUPINGS`, ``five_v`` and ``eight`` as published), add a background channel
(``threshold``: ``bg = max_k m_k < 0.5``) and take ``softmax(15 * [bg, m_1..m_K])`` over the K+1 channels
(:func:`part_masks_from_fields`).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from passreid.atomic_files import atomic_write

__all__ = [
    "BACKGROUND_STRATEGIES",
    "MaskFileError",
    "MaskedImageDataset",
    "NUM_PIFPAF_FIELDS",
    "PART_GROUPINGS",
    "PIFPAF_FIELDS",
    "PIFPAF_JOINTS",
    "PIFPAF_KEYPOINTS",
    "PUBLISHED_MASK_SUFFIXES",
    "add_background",
    "check_masks_exist",
    "group_fields",
    "mask_path",
    "num_parts",
    "part_masks_from_fields",
    "read_pifpaf_fields",
    "resize_masks",
    "write_pifpaf_fields",
]

PIFPAF_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
)
PIFPAF_JOINTS = (
    "left_ankle_to_left_knee", "left_knee_to_left_hip", "right_ankle_to_right_knee", "right_knee_to_right_hip",
    "left_hip_to_right_hip", "left_shoulder_to_left_hip", "right_shoulder_to_right_hip",
    "left_shoulder_to_right_shoulder", "left_shoulder_to_left_elbow", "right_shoulder_to_right_elbow",
    "left_elbow_to_left_wrist", "right_elbow_to_right_wrist", "left_eye_to_right_eye", "nose_to_left_eye",
    "nose_to_right_eye", "left_eye_to_left_ear", "right_eye_to_right_ear", "left_ear_to_left_shoulder",
    "right_ear_to_right_shoulder",
)
PIFPAF_FIELDS = PIFPAF_KEYPOINTS + PIFPAF_JOINTS
NUM_PIFPAF_FIELDS = len(PIFPAF_FIELDS)  # 36

_HEAD = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_eye_to_right_eye", "nose_to_left_eye",
         "nose_to_right_eye", "left_eye_to_left_ear", "right_eye_to_right_ear", "left_ear_to_left_shoulder",
         "right_ear_to_right_shoulder")

#: Published groupings (BPBReID ``masks_preprocess``): part name -> member fields, in channel order.
#: ``five_v`` (Market-1501 training) and ``eight`` (Occluded-Duke and Occluded-REID training) are
#: transcribed as published, including ``five_v``'s asymmetric torso joints.
PART_GROUPINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "five_v": {
        "head": _HEAD,
        "upper_arms_torso": ("left_elbow", "right_elbow", "left_shoulder_to_left_elbow",
                             "right_shoulder_to_right_elbow", "left_shoulder", "right_shoulder",
                             "left_shoulder_to_right_shoulder"),
        "lower_arms_torso": ("left_wrist", "right_wrist", "left_elbow_to_left_wrist", "right_elbow_to_right_wrist",
                             "left_hip", "right_hip", "right_shoulder_to_right_hip"),
        "legs": ("left_hip", "right_hip", "left_knee", "right_knee", "left_ankle_to_left_knee",
                 "left_knee_to_left_hip", "right_ankle_to_right_knee", "right_knee_to_right_hip"),
        "feet": ("left_ankle", "right_ankle"),
    },
    "eight": {
        "head": _HEAD,
        "left_arm": ("left_shoulder", "left_elbow", "left_wrist", "left_shoulder_to_left_elbow",
                     "left_elbow_to_left_wrist"),
        "right_arm": ("right_shoulder", "right_elbow", "right_wrist", "right_shoulder_to_right_elbow",
                      "right_elbow_to_right_wrist"),
        "torso": ("left_hip", "right_hip", "left_hip_to_right_hip", "left_shoulder_to_left_hip",
                  "right_shoulder_to_right_hip", "left_shoulder_to_right_shoulder"),
        "left_leg": ("left_knee", "left_ankle_to_left_knee", "left_knee_to_left_hip", "left_hip_to_right_hip"),
        "right_leg": ("right_knee", "right_ankle_to_right_knee", "right_knee_to_right_hip"),
        "left_foot": ("left_ankle",),
        "right_foot": ("right_ankle",),
    },
    # TSD's groupings (TSD: ``datasets/mask_config.py``): both arms in one part, both legs
    # in another, the torso from the hips and shoulder joints; ``three`` = head / upper body / lower body.
    "five": {
        "head": _HEAD,
        "arms": ("left_shoulder", "left_elbow", "left_wrist", "left_shoulder_to_left_elbow", "left_elbow_to_left_wrist",
                 "right_shoulder", "right_elbow", "right_wrist", "right_shoulder_to_right_elbow",
                 "right_elbow_to_right_wrist"),
        "torso": ("left_hip", "right_hip", "left_hip_to_right_hip", "left_shoulder_to_left_hip",
                  "right_shoulder_to_right_hip", "left_shoulder_to_right_shoulder"),
        "legs": ("left_knee", "left_ankle_to_left_knee", "left_knee_to_left_hip", "left_hip_to_right_hip",
                 "right_knee", "right_ankle_to_right_knee", "right_knee_to_right_hip"),
        "feet": ("left_ankle", "right_ankle"),
    },
    "three": {
        "head": _HEAD,
        "upper_body": ("left_shoulder", "left_elbow", "left_wrist", "left_shoulder_to_left_elbow",
                       "left_elbow_to_left_wrist", "right_shoulder", "right_elbow", "right_wrist",
                       "right_shoulder_to_right_elbow", "right_elbow_to_right_wrist", "left_hip", "right_hip",
                       "left_hip_to_right_hip", "left_shoulder_to_left_hip", "right_shoulder_to_right_hip",
                       "left_shoulder_to_right_shoulder"),
        "lower_body": ("left_knee", "left_ankle_to_left_knee", "left_knee_to_left_hip", "left_hip_to_right_hip",
                       "right_knee", "right_ankle_to_right_knee", "right_knee_to_right_hip", "left_ankle",
                       "right_ankle"),
    },
    "full": {"full_body": PIFPAF_FIELDS},
}

#: File-name suffix after the image stem, per dataset, for ``masks_dir: pifpaf_maskrcnn_filtering``.
PUBLISHED_MASK_SUFFIXES = {
    "market1501": ".npy",
    "market_naming": ".npy",
    "occluded_reid": ".npy",
    "occluded_duke": ".jpg.confidence_fields.npy",
}
DEFAULT_MASK_SUFFIX = ".npy"
BACKGROUND_STRATEGIES = ("threshold", "sum", "diff_from_max")


class MaskFileError(ValueError):
    """A parsing-mask file is missing or does not hold a ``(36, h, w)`` array in [0, 1]."""


def num_parts(grouping: str) -> int:
    """K, the number of body parts of a published grouping."""
    return len(_grouping(grouping))


def _grouping(name: str) -> dict[str, tuple[str, ...]]:
    if name not in PART_GROUPINGS:
        raise ValueError(f"unknown mask grouping {name!r}; expected one of {sorted(PART_GROUPINGS)}")
    return PART_GROUPINGS[name]


# ------------------------------------------------------------------------------------------- files


def mask_path(image_path: str | os.PathLike, masks_dir: str, suffix: str = DEFAULT_MASK_SUFFIX,
              dataset_root: str | os.PathLike | None = None) -> Path:
    """Where the mask of ``image_path`` lives.

    Without ``dataset_root`` this is BPBReID's rule: ``<image's grandparent>/masks/<masks_dir>/<image's folder
    name>/<stem><suffix>`` (images directly in split folders, as in Market-1501 / Occluded-Duke). With
    ``dataset_root`` the split folder is the first folder of the image's path below it (Occluded-REID skips
    the per-identity sub-folder that way).
    """
    image = Path(image_path)
    stem = os.path.splitext(image.name)[0]
    if dataset_root is None:
        return image.parent.parent / "masks" / masks_dir / image.parent.name / f"{stem}{suffix}"
    root = Path(dataset_root)
    try:
        relative = image.relative_to(root)
    except ValueError:
        raise MaskFileError(f"image {image} is not inside the dataset folder {root}") from None
    if len(relative.parts) < 2:
        raise MaskFileError(f"image {image} is not in a split folder below {root}")
    return root / "masks" / masks_dir / relative.parts[0] / f"{stem}{suffix}"


def _check_fields(array: Any, where: str, channels: int = NUM_PIFPAF_FIELDS) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.ndim != 3 or array.shape[0] != channels or min(array.shape) < 1:
        shape = getattr(array, "shape", type(array).__name__)
        raise MaskFileError(f"{where}: expected a ({channels}, h, w) array of PifPaf confidence fields "
                            f"(BPBReID format), got shape {shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise MaskFileError(f"{where}: expected floating-point confidences, got dtype {array.dtype}")
    fields = array.astype(np.float32, copy=False)
    if not np.isfinite(fields).all():
        raise MaskFileError(f"{where}: contains NaN or Inf")
    low, high = float(fields.min()), float(fields.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise MaskFileError(f"{where}: confidences must lie in [0, 1], got [{low:.3f}, {high:.3f}]")
    return fields


def read_pifpaf_fields(path: str | os.PathLike, image_path: str | os.PathLike | None = None) -> np.ndarray:
    """The ``(36, h, w)`` float32 fields stored at ``path``; errors name the file (and its image)."""
    path = Path(path)
    owner = f" (mask of {image_path})" if image_path is not None else ""
    if not path.is_file():
        raise MaskFileError(f"parsing mask not found: {path}{owner}")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MaskFileError(f"{path}{owner}: not a readable .npy file ({exc})") from exc
    return _check_fields(array, f"{path}{owner}")


def write_pifpaf_fields(path: str | os.PathLike, fields: np.ndarray) -> Path:
    """Save ``(36, h, w)`` fields in [0, 1] as float32 ``.npy`` (the published layout); returns ``path``."""
    path = Path(path)
    checked = _check_fields(np.asarray(fields), f"fields for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda handle: np.save(handle, np.ascontiguousarray(checked, dtype=np.float32)),
                        what="mask file")


def check_masks_exist(image_paths: Sequence[str | os.PathLike], masks_dir: str, suffix: str,
                      dataset_root: str | os.PathLike | None = None) -> list[Path]:
    """The mask path of every image; raises :class:`MaskFileError` listing the missing ones (none skipped)."""
    paths = [mask_path(p, masks_dir, suffix, dataset_root) for p in image_paths]
    missing = [(image, path) for image, path in zip(image_paths, paths) if not path.is_file()]
    if missing:
        shown = "\n".join(f"  {image} -> {path}" for image, path in missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MaskFileError(
            f"{len(missing)} of {len(paths)} images have no parsing mask (expected BPBReID layout "
            f"<dataset>/masks/{masks_dir}/<split folder>/<stem>{suffix}):\n{shown}{more}")
    return paths


# ----------------------------------------------------------------------------------------- targets


def group_fields(fields: torch.Tensor, grouping: str) -> torch.Tensor:
    """``(36, h, w)`` fields -> ``(K, h, w)`` parts: channel-wise max over each part's fields, clipped to [0, 1]."""
    parts = _grouping(grouping)
    if fields.ndim != 3 or fields.shape[0] != NUM_PIFPAF_FIELDS:
        raise ValueError(f"group_fields expects ({NUM_PIFPAF_FIELDS}, h, w) fields, got {tuple(fields.shape)}")
    index = {name: i for i, name in enumerate(PIFPAF_FIELDS)}
    grouped = [fields[[index[name] for name in members]].amax(dim=0) for members in parts.values()]
    return torch.stack(grouped).clamp(0.0, 1.0)


def add_background(parts: torch.Tensor, strategy: str = "threshold", threshold: float = 0.5,
                   softmax_weight: float = 15.0) -> torch.Tensor:
    """``(K, h, w)`` -> ``(K+1, h, w)`` with the background first, then normalised over the channels.

    ``threshold``: ``bg = max_k m_k < threshold`` (0/1); ``sum``: ``clip(1 - sum_k m_k)``; ``diff_from_max``:
    ``1 - max_k m_k``. Then ``softmax(softmax_weight * masks)`` over channels, or (weight 0) division by the
    channel sum, as published.
    """
    if strategy == "threshold":
        background = (parts.amax(dim=0) < threshold).to(parts.dtype)
    elif strategy == "sum":
        background = (1.0 - parts.sum(dim=0)).clamp(0.0, 1.0)
    elif strategy == "diff_from_max":
        background = (1.0 - parts.amax(dim=0)).clamp(0.0, 1.0)
    else:
        raise ValueError(f"unknown background strategy {strategy!r}; expected one of {BACKGROUND_STRATEGIES}")
    masks = torch.cat([background.unsqueeze(0), parts])
    if softmax_weight > 0:
        return torch.softmax(masks * softmax_weight, dim=0)
    return masks / masks.sum(dim=0, keepdim=True).clamp(min=1e-12)


def resize_masks(masks: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """``(C, h, w)`` -> ``(C, H, W)`` (nearest by default, as BPBReID's mask transforms)."""
    if tuple(masks.shape[1:]) == tuple(size):
        return masks
    return F.interpolate(masks.unsqueeze(0), size=tuple(size), mode=mode).squeeze(0)


def part_masks_from_fields(fields: torch.Tensor, grouping: str, size: tuple[int, int] | None = None,
                           strategy: str = "threshold", threshold: float = 0.5,
                           softmax_weight: float = 15.0) -> torch.Tensor:
    """Training target ``(K+1, H, W)`` from ``(36, h, w)`` fields: group, add the background, resize (nearest)."""
    masks = add_background(group_fields(fields, grouping), strategy, threshold, softmax_weight)
    return resize_masks(masks, size) if size is not None else masks


# ----------------------------------------------------------------------------------------- dataset


class MaskedImageDataset(Dataset):
    """Images paired with their parsing masks: ``dict(img, masks, pid, camid, index)``.

    ``transform(image, fields)`` gets the PIL image and its ``(36, h, w)`` fields (or ``None`` with
    ``masks_source="constant"``, which pairs every image with an all-foreground mask so that only the
    augmentation's geometry and erasing shape it) and returns ``(img tensor, masks tensor)``. Every mask
    file is checked for existence when the dataset is built; shape and range are checked on reading.
    """

    def __init__(self, items: Sequence[Any], transform: Callable, masks_dir: str = "pifpaf_maskrcnn_filtering",
                 suffix: str = DEFAULT_MASK_SUFFIX, dataset_root: str | os.PathLike | None = None,
                 masks_source: str = "parsing", reader: Callable[[str], Any] | None = None) -> None:
        if masks_source not in ("parsing", "constant"):
            raise ValueError(f"masks_source must be 'parsing' or 'constant', got {masks_source!r}")
        for position, item in enumerate(items):
            if len(item) < 3:
                raise ValueError(f"MaskedImageDataset item {position} is {item!r}; expected (path, pid, camid)")
        self.items = list(items)
        self.transform = transform
        self.masks_source = masks_source
        self.mask_paths = (check_masks_exist([item[0] for item in self.items], masks_dir, suffix, dataset_root)
                           if masks_source == "parsing" else [None] * len(self.items))
        if reader is None:
            from passreid.data.images import read_image as reader
        self.reader = reader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, pid, camid = self.items[index][:3]
        image = self.reader(path)
        mask_file = self.mask_paths[index]
        fields = read_pifpaf_fields(mask_file, path) if mask_file is not None else None
        img, masks = self.transform(image, fields)
        return {"img": img, "masks": masks, "pid": int(pid), "camid": int(camid), "index": int(index)}
