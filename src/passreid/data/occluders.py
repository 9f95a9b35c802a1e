"""Occluder paste: a training augmentation that pastes a random occluder cut-out onto a person image.

An occluder is an RGBA image whose alpha marks the object (a box, a pole, a car, another person...).
With probability ``p`` the transform picks one at random, resizes it so that its bounding box covers a
fraction ``a ~ U(area_min, area_max)`` of the image, places the box uniformly inside the image and
alpha-blends it (``out = alpha * occluder + (1 - alpha) * image``). The aspect ratio of the cut-out is
kept unless its box would not fit inside the image; then the side that is too long is clipped to the
image and the other side grows so that the box still covers ``a`` of the image. The occluder is
mirrored left-right with probability 0.5.

Occluders come from a folder of ``*.png`` files with an alpha channel; the generated world writes one
(``<world>/occluders/``). All randomness comes from torch's global generator, like the other training
transforms (:mod:`passreid.data.transforms`), so a seed makes it reproducible.

:func:`cutouts_from_black_background` turns a folder of cut-outs on a black background (DPEFormer's released
SA-1B-crop: ``<folder>/<group>/<image>``, RGB, black outside the SAM segment) into such a folder
(``tools/prepare_occluders.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["CutoutSummary", "OccluderPaste", "PastePlan", "cutouts_from_black_background", "load_occluders"]


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def load_occluders(folder: str | Path) -> list[Image.Image]:
    """Every ``*.png`` of ``folder`` as an RGBA image (sorted by name).

    Raises ``FileNotFoundError`` when the folder does not exist and ``ValueError`` when it holds no
    PNG, or a PNG without an alpha channel or that is fully transparent (a cut-out is expected), naming
    the files.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"occluder folder {folder} does not exist (data.occluder_dir): expected a folder "
                                "of RGBA *.png cut-outs, e.g. <generated world>/occluders")
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise ValueError(f"occluder folder {folder} holds no *.png file: expected RGBA cut-outs")
    occluders, unusable = [], []
    for path in paths:
        with Image.open(path) as image:
            if not _has_alpha(image):
                unusable.append(f"{path.name} (mode {image.mode}, no alpha channel)")
                continue
            rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[1] == 0:
            unusable.append(f"{path.name} (fully transparent)")
            continue
        occluders.append(rgba)
    if unusable:
        raise ValueError(f"occluder folder {folder}: {len(unusable)} unusable image(s), expected RGBA cut-outs "
                         f"with a visible object: {', '.join(unusable)}")
    return occluders


@dataclass(frozen=True)
class PastePlan:
    """Which occluder goes where: ``index`` into the occluders, box ``(left, top, width, height)``, mirrored."""

    index: int
    left: int
    top: int
    width: int
    height: int
    mirror: bool


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _randint(low: int, high: int) -> int:
    """Uniform integer in ``[low, high]``."""
    return int(torch.randint(low, high + 1, ()).item())


class OccluderPaste:
    """PIL -> PIL transform pasting a random occluder with probability ``p`` (module docstring)."""

    def __init__(self, occluders: list[Image.Image] | str | Path, p: float = 0.5,
                 area: tuple[float, float] = (0.1, 0.4)) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"occluder paste probability must be in [0, 1], got {p}")
        if not 0.0 < area[0] <= area[1] <= 1.0:
            raise ValueError(f"occluder area range must satisfy 0 < min <= max <= 1, got {area}")
        self.occluders = load_occluders(occluders) if isinstance(occluders, (str, Path)) else list(occluders)
        if not self.occluders:
            raise ValueError("OccluderPaste needs at least one occluder image")
        bad = [i for i, occ in enumerate(self.occluders) if occ.mode != "RGBA"]
        if bad:
            raise ValueError(f"occluders must be RGBA images; those at {bad} are not (use load_occluders)")
        self.p = p
        self.area = (float(area[0]), float(area[1]))

    def plan(self, width: int, height: int) -> PastePlan | None:
        """Draw the paste for a ``width x height`` image, or ``None`` (not pasted this time)."""
        if torch.rand(()).item() >= self.p:
            return None
        index = _randint(0, len(self.occluders) - 1)
        occ_w, occ_h = self.occluders[index].size
        target = _uniform(*self.area) * width * height
        box_w, box_h = self._box_size(target, occ_h / occ_w, width, height)
        left = _randint(0, width - box_w)
        top = _randint(0, height - box_h)
        mirror = torch.rand(()).item() < 0.5
        return PastePlan(index, left, top, box_w, box_h, mirror)

    @staticmethod
    def _box_size(target_area: float, aspect: float, width: int, height: int) -> tuple[int, int]:
        """Box ``(w, h)`` with ``w * h ~ target_area`` and ``h / w = aspect`` unless it must be clipped."""
        box_h = math.sqrt(target_area * aspect)
        box_w = target_area / box_h
        if box_w > width:
            box_w, box_h = width, target_area / width
        elif box_h > height:
            box_w, box_h = target_area / height, height
        return (min(width, max(1, round(box_w))), min(height, max(1, round(box_h))))

    def occluder_for(self, plan: PastePlan) -> Image.Image:
        """The RGBA occluder of ``plan``, resized to its box and mirrored when asked."""
        occluder = self.occluders[plan.index].resize((plan.width, plan.height), Image.Resampling.BILINEAR)
        return occluder.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if plan.mirror else occluder

    def apply(self, image: Image.Image, plan: PastePlan | None) -> Image.Image:
        """``image`` with the occluder of ``plan`` alpha-blended in (a new image; the input is unchanged)."""
        if plan is None:
            return image
        base = image.convert("RGB")
        occluder = self.occluder_for(plan)
        base.paste(occluder, (plan.left, plan.top), mask=occluder.getchannel("A"))
        return base

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.apply(image, self.plan(*image.size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.occluders)} occluders, p={self.p}, area={self.area})"



# ------------------------------------------------------------------------------ cut-outs on black

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class CutoutSummary:
    """What :func:`cutouts_from_black_background` did: PNGs written, images left out (all black) or unreadable."""

    written: int
    all_black: list[str]
    unreadable: list[str]


def _cutout(image: Image.Image) -> Image.Image | None:
    """RGBA copy, opaque where any channel is > 0, cropped to the opaque box; ``None`` when all black."""
    rgb = image.convert("RGB")
    alpha = Image.fromarray(((np.asarray(rgb).max(axis=2) > 0) * 255).astype(np.uint8))  # mode L
    box = alpha.getbbox()
    if box is None:
        return None
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    return rgba.crop(box)


def cutouts_from_black_background(source: str | Path, output: str | Path) -> CutoutSummary:
    """Write every image under ``source`` (any depth) as an RGBA cut-out ``<output>/<path with / as __>.png``.

    A pixel is transparent iff all three channels are 0: the released DPEFormer paste (zhangxin06/DPEFormer,
    model/SAM.py, ``paste_on_person``) keeps the person wherever the crop is 0, and its SA-1B crops are black
    outside the segment. Raises ``FileNotFoundError`` for a missing ``source`` and ``ValueError`` when it holds
    no image or no usable one.
    """
    source, output = Path(source).expanduser(), Path(output).expanduser()
    if not source.is_dir():
        raise FileNotFoundError(f"cut-out source folder {source} does not exist")
    paths = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{source} holds no image ({', '.join(_IMAGE_SUFFIXES)}) at any depth")
    output.mkdir(parents=True, exist_ok=True)
    written, all_black, unreadable = 0, [], []
    for path in paths:
        relative = path.relative_to(source)
        try:
            with Image.open(path) as image:
                cutout = _cutout(image)
        except OSError:
            unreadable.append(str(relative))
            continue
        if cutout is None:
            all_black.append(str(relative))
            continue
        cutout.save(output / ("__".join(relative.with_suffix("").parts) + ".png"))
        written += 1
    if not written:
        raise ValueError(f"{source}: none of its {len(paths)} images has a non-black pixel or could be read")
    return CutoutSummary(written, all_black, unreadable)
