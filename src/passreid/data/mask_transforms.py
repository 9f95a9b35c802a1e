"""Mask-aware training augmentation: one geometric transform applied to an image and its parsing masks.

BPBReID's pipeline (bpbreid: ``torchreid/data/transforms.py``) on (image, 36 fields):

1. resize the image to (H, W) and the fields to the same size (nearest);
2. horizontal flip (same draw for both; channels are not swapped left/right, as published);
3. zero-pad ``padding`` pixels and random-crop back to (H, W) (same offsets; masks padded with 0);
4. to tensor, normalise the image;
5. random erasing of one rectangle: the image gets the fill, the masks get 0 inside it (``mask_fill_value=0``).
   ``erasing="coarse_dropout"`` is BPBReID's (p, a hole of 15-65 % of H and of W, constant ImageNet-mean
   fill); ``erasing="pixel"`` is the TransReID-family :class:`~passreid.data.transforms.RandomErasing`;
6. group the fields into K parts, add the background channel, softmax (:func:`part_masks_from_fields`);
7. resize the (K+1) masks to (H / mask_scale, W / mask_scale), nearest.

All randomness comes from torch's global generator (seeded per DataLoader worker).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from passreid.data.masks import BACKGROUND_STRATEGIES, PART_GROUPINGS, part_masks_from_fields, resize_masks
from passreid.data.transforms import HALF, RandomErasing

__all__ = ["ERASING_MODES", "MaskedTestTransform", "MaskedTrainTransform", "coarse_dropout_box"]

ERASING_MODES = ("coarse_dropout", "pixel")
IMAGENET_MEAN = (0.485, 0.456, 0.406)


def coarse_dropout_box(height: int, width: int, probability: float = 0.5, min_frac: float = 0.15,
                       max_frac: float = 0.65) -> tuple[int, int, int, int] | None:
    """BPBReID's CoarseDropout hole ``(top, left, h, w)``: with ``probability``, ``h`` uniform in
    ``[int(min_frac H), int(max_frac H)]`` (same for ``w``), placed uniformly; else ``None``."""
    if torch.rand(()).item() >= probability:
        return None
    h = int(torch.randint(int(height * min_frac), int(height * max_frac) + 1, ()).item())
    w = int(torch.randint(int(width * min_frac), int(width * max_frac) + 1, ()).item())
    if h < 1 or w < 1:
        return None
    top = int(torch.randint(0, height - h + 1, ()).item())
    left = int(torch.randint(0, width - w + 1, ()).item())
    return top, left, h, w


class MaskedTrainTransform:
    """``(PIL image, fields (36, h, w) ndarray or None) -> (img (3, H, W), masks (K+1, H/s, W/s))``.

    ``fields=None`` (``masks_source="constant"``) starts from an all-foreground single channel, so the output
    ``(2, H/s, W/s)`` = [background, foreground] only shows where padding and erasing removed the image.
    """

    def __init__(self, size: Sequence[int] = (256, 128), grouping: str = "five_v", flip_p: float = 0.5,
                 padding: int = 10, erasing_p: float = 0.5, erasing: str = "coarse_dropout",
                 mean: Sequence[float] = HALF, std: Sequence[float] = HALF, background: str = "threshold",
                 background_threshold: float = 0.5, softmax_weight: float = 15.0, mask_scale: int = 4) -> None:
        self.height, self.width = int(size[0]), int(size[1])
        if grouping not in PART_GROUPINGS:
            raise ValueError(f"unknown mask grouping {grouping!r}; expected one of {sorted(PART_GROUPINGS)}")
        if erasing not in ERASING_MODES:
            raise ValueError(f"erasing must be one of {ERASING_MODES}, got {erasing!r}")
        if background not in BACKGROUND_STRATEGIES:
            raise ValueError(f"background must be one of {BACKGROUND_STRATEGIES}, got {background!r}")
        if not 0.0 <= flip_p <= 1.0 or not 0.0 <= erasing_p <= 1.0:
            raise ValueError(f"flip_p and erasing_p must be probabilities, got {flip_p}, {erasing_p}")
        if padding < 0 or mask_scale < 1:
            raise ValueError(f"padding must be >= 0 and mask_scale >= 1, got {padding}, {mask_scale}")
        self.grouping, self.flip_p, self.padding = grouping, flip_p, padding
        self.erasing, self.erasing_p = erasing, erasing_p
        self.pixel_erasing = RandomErasing(erasing_p)
        self.mean, self.std = tuple(mean), tuple(std)
        self.background, self.background_threshold, self.softmax_weight = background, background_threshold, softmax_weight
        self.mask_size = (self.height // mask_scale, self.width // mask_scale)

    def _geometry(self, img: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flip, pad and crop image (3, H, W) and masks (C, H, W) with the same draws."""
        if torch.rand(()).item() < self.flip_p:
            img, masks = img.flip(-1), masks.flip(-1)
        if self.padding:
            pad = [self.padding] * 4
            img, masks = F.pad(img, pad), F.pad(masks, pad)
            top = int(torch.randint(0, img.shape[1] - self.height + 1, ()).item())
            left = int(torch.randint(0, img.shape[2] - self.width + 1, ()).item())
            img = img[:, top:top + self.height, left:left + self.width]
            masks = masks[:, top:top + self.height, left:left + self.width]
        return img, masks

    def _erase(self, img: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erasing == "coarse_dropout":
            box = coarse_dropout_box(self.height, self.width, self.erasing_p)
        else:
            box = self.pixel_erasing.sample_box(self.height, self.width)
        if box is None:
            return img, masks
        top, left, h, w = box
        img, masks = img.clone(), masks.clone()
        if self.erasing == "coarse_dropout":
            img[:, top:top + h, left:left + w] = torch.tensor(IMAGENET_MEAN, dtype=img.dtype).view(3, 1, 1)
        else:
            img[:, top:top + h, left:left + w] = torch.randn((img.shape[0], h, w), dtype=img.dtype)
        masks[:, top:top + h, left:left + w] = 0.0
        return img, masks

    def __call__(self, image, fields: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        resized = TF.resize(image, [self.height, self.width], interpolation=InterpolationMode.BICUBIC)
        img = TF.to_tensor(resized)
        if fields is None:
            masks = torch.ones(1, self.height, self.width)
        else:
            masks = resize_masks(torch.as_tensor(np.asarray(fields, np.float32)), (self.height, self.width))
        img, masks = self._geometry(img, masks)
        img = TF.normalize(img, self.mean, self.std)
        img, masks = self._erase(img, masks)
        if fields is None:
            foreground = resize_masks(masks, self.mask_size)
            return img, torch.cat([1.0 - foreground, foreground])
        target = part_masks_from_fields(masks, self.grouping, self.mask_size, self.background,
                                        self.background_threshold, self.softmax_weight)
        return img, target


class MaskedTestTransform:
    """Test-time pairing (for inspection / pixel accuracy): resize + normalise the image, target masks at
    (H/s, W/s). Test *features* never need masks (BPBReID predicts its own attention)."""

    def __init__(self, size: Sequence[int] = (256, 128), grouping: str = "five_v", mean: Sequence[float] = HALF,
                 std: Sequence[float] = HALF, background: str = "threshold", background_threshold: float = 0.5,
                 softmax_weight: float = 15.0, mask_scale: int = 4) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.grouping, self.mean, self.std = grouping, tuple(mean), tuple(std)
        self.background, self.background_threshold, self.softmax_weight = background, background_threshold, softmax_weight
        self.mask_size = (self.size[0] // mask_scale, self.size[1] // mask_scale)

    def __call__(self, image, fields: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        img = TF.to_tensor(TF.resize(image, list(self.size), interpolation=InterpolationMode.BILINEAR))
        img = TF.normalize(img, self.mean, self.std)
        masks = resize_masks(torch.as_tensor(np.asarray(fields, np.float32)), self.size)
        return img, part_masks_from_fields(masks, self.grouping, self.mask_size, self.background,
                                           self.background_threshold, self.softmax_weight)
