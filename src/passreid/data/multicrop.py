"""PASS / DINO multi-crop augmentation: 2 global views plus local views cut from horizontal bands.

Published PASS recipe (PASS-reID: PASS/main_pass.py, ``DataAugmentationDINO``): for an input of H x W pixels,

* global view 1: ``RandomResizedCrop((256, 128), scale=(0.4, 1.0), bicubic)`` -> flip / colour
  jitter / grayscale -> Gaussian blur (p=1.0) -> normalise;
* global view 2: the same crop and colour pipeline -> blur (p=0.1) -> solarize (p=0.2) -> normalise;
* local views: the image is first hard-cropped to one of three full-width, 50 %-overlapping bands,
  rows ``[0, .5H)``, ``[.25H, .75H)`` and ``[.5H, H)``; each band yields ``local_crops_number // 3``
  views ``RandomResizedCrop((128, 64), scale=(0.1, 0.8), bicubic)`` -> colour -> blur (p=0.5) ->
  normalise. The crop scale is relative to the band (half the image).

Output order ``[g1, g2, u.., m.., l..]`` (9 locals: ``[g1, g2, u, u, u, m, m, m, l, l, l]``), which
the meta-architecture slices by band. ``mode="dino"`` cuts the locals from the whole image instead
(plain DINO as in TransReID-SSL: 128x64 locals, default scale (0.05, 0.4)).

Every random draw comes from torch's global generator (torchvision transforms, and the blur and
solarize below), so ``torch.manual_seed`` or a DataLoader worker seed makes the views reproducible.
The torchvision ``RandomResizedCrop`` aspect-ratio range is kept at its default ``(3/4, 4/3)``:
on tall person crops many global crops fall back to a centre crop (torchvision's RandomResizedCrop after 10 failed draws); that is
the published behaviour and is reproduced on purpose.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MULTICROP_MODES",
    "NUM_BANDS",
    "RandomGaussianBlur",
    "RandomSolarize",
    "MultiCropAugmentation",
    "band_rows",
    "crop_bands",
]

# Pre-training normalises with ImageNet statistics (PASS/main_pass.py); fine-tuning uses 0.5/0.5
# (PASS_transreid/configs/*/vit_*.yml, INPUT.PIXEL_MEAN / PIXEL_STD).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

MULTICROP_MODES = ("pass", "dino")
NUM_BANDS = 3
# Default local-crop scale per mode: relative to a band (PASS) or to the whole image (DINO). A
# band is half the image, so both cover 5-40 % of the image area.
_DEFAULT_LOCAL_SCALE = {"pass": (0.1, 0.8), "dino": (0.05, 0.4)}


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


class RandomGaussianBlur:
    """PIL Gaussian blur with radius ~ U(radius_min, radius_max), applied with probability ``p``."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        _check_probability("RandomGaussianBlur p", p)
        if not 0.0 <= radius_min <= radius_max:
            raise ValueError(f"need 0 <= radius_min <= radius_max, got {radius_min}, {radius_max}")
        self.p = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def draw(self) -> float | None:
        """This call's random draw: the blur radius, or ``None`` for no blur (the device-side
        multi-crop, ``passreid.data.device_multicrop``, draws through this method too)."""
        if torch.rand(()).item() >= self.p:
            return None
        return _uniform(self.radius_min, self.radius_max)

    def __call__(self, image: Image.Image) -> Image.Image:
        radius = self.draw()
        return image if radius is None else image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius=({self.radius_min}, {self.radius_max}))"


class RandomSolarize:
    """``PIL.ImageOps.solarize`` (threshold 128: invert pixels >= 128) with probability ``p``."""

    def __init__(self, p: float = 0.2, threshold: int = 128):
        _check_probability("RandomSolarize p", p)
        self.p = p
        self.threshold = threshold

    def draw(self) -> bool:
        """This call's random draw: solarise or not."""
        return torch.rand(()).item() < self.p

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image, threshold=self.threshold) if self.draw() else image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, threshold={self.threshold})"


def band_rows(height: int) -> list[tuple[int, int]]:
    """``(top, band_height)`` of the upper, middle and lower band of an image ``height`` rows tall.

    As published: ``(0, int(.5H))``, ``(int(.25H), int(.5H))``, ``(int(.5H), int(.5H))``.
    """
    if height < 2:
        raise ValueError(f"an image must be at least 2 rows tall to cut bands, got height {height}")
    band_height = int(0.5 * height)
    return [(0, band_height), (int(0.25 * height), band_height), (int(0.5 * height), band_height)]


def crop_bands(image: Image.Image) -> list[Image.Image]:
    """The three full-width horizontal bands of ``image`` (upper, middle, lower)."""
    width, height = image.size
    return [TF.crop(image, top, 0, band_height, width) for top, band_height in band_rows(height)]


def _check_size(name: str, size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"{name} must be (height, width) with positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {scale!r}")
    return float(scale[0]), float(scale[1])


class MultiCropAugmentation:
    """PIL image -> list of normalised view tensors ``[g1, g2, locals...]`` (module docstring).

    Args:
        global_size, local_size: (height, width) of the global and local views.
        global_scale: RandomResizedCrop area range of the global views (relative to the image).
        local_scale: area range of the local views, relative to the band (``"pass"``) or to the
            image (``"dino"``). ``None`` picks the published default of the mode: (0.1, 0.8) for
            PASS, (0.05, 0.4) for DINO.
        local_crops_number: number of local views; in ``"pass"`` mode a multiple of 3
            (``local_crops_number // 3`` per band; the published recipe uses 9).
        mode: ``"pass"`` (band locals) or ``"dino"`` (whole-image locals, the plain-DINO ablation).
        mean, std: normalisation (ImageNet statistics, as published).

    Attributes:
        num_global (2), num_local, crops_per_band (0 in ``"dino"`` mode), and the three transforms
        ``global_transform1``, ``global_transform2``, ``local_transform`` (torchvision ``Compose``).
    """

    num_global = 2

    def __init__(
        self,
        global_size: Sequence[int] = (256, 128),
        local_size: Sequence[int] = (128, 64),
        global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] | None = None,
        local_crops_number: int = 9,
        mode: str = "pass",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if mode not in MULTICROP_MODES:
            raise ValueError(f"mode must be one of {MULTICROP_MODES}, got {mode!r}")
        if local_crops_number < 1:
            raise ValueError(f"local_crops_number must be >= 1, got {local_crops_number}")
        if mode == "pass" and local_crops_number % NUM_BANDS != 0:
            raise ValueError(
                f"mode 'pass' cuts the same number of local crops from each of the {NUM_BANDS} bands, "
                f"so local_crops_number must be a multiple of {NUM_BANDS} (published: 9), got "
                f"{local_crops_number}"
            )
        self.mode = mode
        self.global_size = _check_size("global_size", global_size)
        self.local_size = _check_size("local_size", local_size)
        self.global_scale = _check_scale("global_scale", global_scale)
        self.local_scale = _check_scale(
            "local_scale", _DEFAULT_LOCAL_SCALE[mode] if local_scale is None else local_scale
        )
        self.num_local = local_crops_number
        self.crops_per_band = local_crops_number // NUM_BANDS if mode == "pass" else 0
        self.mean = tuple(mean)
        self.std = tuple(std)

        flip_and_color = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

        def global_crop() -> T.RandomResizedCrop:
            return T.RandomResizedCrop(
                self.global_size, scale=self.global_scale, interpolation=InterpolationMode.BICUBIC
            )

        self.global_transform1: Callable[[Image.Image], Tensor] = T.Compose([
            global_crop(), flip_and_color, RandomGaussianBlur(1.0), normalize,
        ])
        self.global_transform2: Callable[[Image.Image], Tensor] = T.Compose([
            global_crop(), flip_and_color, RandomGaussianBlur(0.1), RandomSolarize(0.2), normalize,
        ])
        self.local_transform: Callable[[Image.Image], Tensor] = T.Compose([
            T.RandomResizedCrop(self.local_size, scale=self.local_scale, interpolation=InterpolationMode.BICUBIC),
            flip_and_color,
            RandomGaussianBlur(0.5),
            normalize,
        ])

    @property
    def num_views(self) -> int:
        """Total number of views per image: 2 + ``num_local``."""
        return self.num_global + self.num_local

    def local_sources(self, image: Image.Image) -> list[Image.Image]:
        """The image each local view is cut from, in output order (bands, or the whole image)."""
        if self.mode == "dino":
            return [image] * self.num_local
        return [band for band in crop_bands(image) for _ in range(self.crops_per_band)]

    def __call__(self, image: Image.Image) -> list[Tensor]:
        """``[g1, g2, locals...]``: 2 tensors (3, *global_size) then ``num_local`` (3, *local_size)."""
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"MultiCropAugmentation expects a PIL image (e.g. from passreid.data.read_image), "
                f"got {type(image).__name__}"
            )
        views = [self.global_transform1(image), self.global_transform2(image)]
        views += [self.local_transform(source) for source in self.local_sources(image)]
        return views

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mode={self.mode!r}, global_size={self.global_size}, "
            f"local_size={self.local_size}, global_scale={self.global_scale}, "
            f"local_scale={self.local_scale}, local_crops_number={self.num_local})"
        )
