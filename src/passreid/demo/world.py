"""A small, deterministic re-ID world rendered with numpy + PIL: the embedded default dataset.

One file of ~1,150 lines on purpose: it renders one coherent world (identities, cameras, bodies, occluders,
parsing masks, keypoint fields) whose pieces share the body layout and the seeded random streams; it is the
demo's and the tests' data set (:mod:`passreid.demo`); the training stages never import it.

``generate_world(out_dir)`` writes, with no download:

* ``market/``          Market-1501 layout and file names (``bounding_box_train``, ``query``,
                       ``bounding_box_test``; ``<pid:04d>_c<cam>s1_<frame:06d>_<bbox:02d>.jpg``, cam 1-based),
                       including pid ``0000`` distractors and pid ``-1`` junk in the gallery folder;
* ``market_occluded/`` the same images, but every query and ~10% of the gallery/train images carry an
                       occluder covering 20-50% of the body (Occluded-Duke design), and TSD's holistic-query
                       split lists ``new_query.txt`` / ``new_gallery.txt`` (:func:`occlusion_records`), so the
                       folder reads as ``occluded_duke_tsd`` too;
* ``<subset>/masks/pifpaf_maskrcnn_filtering/<split folder>/<stem>.npy``: a human-parsing mask for every image
                       of both subsets in BPBReID's published format (36 PifPaf confidence fields at 1/4 resolution,
                       :mod:`passreid.data.masks`), drawn from the known body layout; occluded cells have zero
                       confidence. Masks draw no random numbers, so the images are the same with or without them;
* ``occluders/``       the RGBA occluder cut-outs that were pasted (boxes, poles, cars, people, bushes);
* ``pool/``            an unlabeled pool of crops in per-video sub-folders (LUPerson-style pre-training);
* ``world.json``       the spec, the generator version and per-split counts.

Each identity has its own clothing colours, garment pattern, body shape and accessories; each camera its
own background, lighting, viewpoint (front/back, mirror, shear) and framing. Every image jitters pose,
scale, position and colour, so identities are recognisable across cameras but not trivially.
``style="b"`` renders a second world with a different camera/lighting palette and other people, for
domain adaptation experiments.

Everything is a pure function of the spec: each image draws from its own random stream keyed by
(seed, style, purpose, indices), so re-running gives identical bytes.
"""
from __future__ import annotations

import argparse
import colorsys
import dataclasses
import fcntl
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageFilter

from passreid.atomic_files import atomic_write_text
from passreid.data import masks

GENERATOR_VERSION = 3   # 2: parsing masks next to the images; 3: TSD split lists in market_occluded/ (images unchanged)
STYLES = ("a", "b")
OCCLUDER_KINDS = ("box", "pole", "car", "person", "bush")
SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
OWN_OUTPUTS = ("market", "market_occluded", "occluders", "pool", "world.json")
QUERY_OCCLUSION_RANGE = (0.2, 0.5)   # fraction of the body's pixels an occluder hides
OTHER_OCCLUSION_RATE = 0.1           # share of gallery/train images occluded in market_occluded
JPEG_QUALITY = 92
WORLD_MASKS_DIR = "pifpaf_maskrcnn_filtering"   # BPBReID's mask folder name; Market's suffix ".npy"
MASK_STRIDE = 4                                # fields at 1/4 of the image size (32x16 for 128x64 crops)

Colour = tuple[float, float, float]
Box = tuple[int, int, int, int]      # x0, y0, x1, y1 in pixels, x1/y1 exclusive

# Random-stream purposes: each image/identity/camera gets its own stream keyed by these codes.
_STREAM_PIDS, _STREAM_IDENTITY, _STREAM_CAMERA, _STREAM_LAYOUT, _STREAM_IMAGE = 1, 2, 3, 4, 5
_STREAM_OCCLUDER, _STREAM_OCCLUSION, _STREAM_POOL, _STREAM_BACKGROUND = 6, 7, 8, 9


@dataclass(frozen=True)
class SyntheticWorldSpec:
    """What to render. Equal specs give byte-identical worlds."""

    num_train_ids: int = 24
    num_test_ids: int = 24
    num_cameras: int = 4
    images_per_id_per_camera: int = 2   # mean; actual counts vary 1..2x-1 so some ids have few images
    height: int = 128
    width: int = 64
    seed: int = 0
    occluded: bool = True               # also write market_occluded/
    style: str = "a"
    pool_size: int = 400
    num_distractors: int = 16           # pid 0 gallery images (people outside the test set)
    num_junk: int = 8                   # pid -1 gallery images (bad detections; readers drop them)
    num_occluders: int = 30

    def __post_init__(self) -> None:
        minimums = {"num_train_ids": 1, "num_test_ids": 1, "num_cameras": 2, "images_per_id_per_camera": 1,
                    "height": 32, "width": 16, "seed": 0, "pool_size": 0, "num_distractors": 0,
                    "num_junk": 0, "num_occluders": 1}
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"SyntheticWorldSpec.{name} must be an int >= {minimum}, got {value!r}")
        if self.num_cameras > 9:
            raise ValueError(f"SyntheticWorldSpec.num_cameras must be <= 9 (one digit in Market names), "
                             f"got {self.num_cameras}")
        if self.num_train_ids + self.num_test_ids > 4000:
            raise ValueError("SyntheticWorldSpec: num_train_ids + num_test_ids must be <= 4000 (4-digit pids)")
        if self.style not in STYLES:
            raise ValueError(f"SyntheticWorldSpec.style must be one of {STYLES}, got {self.style!r}")
        if not isinstance(self.occluded, bool):
            raise ValueError(f"SyntheticWorldSpec.occluded must be a bool, got {self.occluded!r}")


@dataclass(frozen=True)
class Identity:
    """Appearance of one person: clothing, body shape and accessories (colours are RGB in [0, 1])."""

    upper: Colour
    lower: Colour
    shoes: Colour
    skin: Colour
    hair: Colour
    pattern: str                 # "plain" | "stripes" | "vstripes" | "checks" | "logo"
    pattern_colour: Colour
    pattern_period: float        # stripe/check period as a fraction of body height
    height: float                # body height as a fraction of image height
    shoulder: float              # half shoulder width as a fraction of body height
    head: float                  # head (vertical) radius as a fraction of body height
    legs: float                  # leg length as a fraction of body height
    long_sleeves: bool
    bag: str                     # "none" | "backpack" | "shoulder"
    bag_colour: Colour
    hat: bool
    hat_colour: Colour


@dataclass(frozen=True)
class Camera:
    """A scene: background, lighting, viewpoint and framing shared by all its images."""

    background: str              # "gradient" | "wall_floor" | "tiles" | "bars" | "texture"
    bg_colours: tuple[Colour, Colour]
    bg_period: int               # tile/bar size in pixels
    bg_seed: int
    gain: float
    contrast: float
    cast: Colour                 # per-channel multiplier
    noise: float                 # pixel noise std (0..1 scale)
    blur: float                  # Gaussian blur radius in pixels
    facing: str                  # the usual view: "front" | "back"
    mirrored: bool
    shear: float                 # horizontal shift per pixel of height (viewpoint tilt)
    scale: float                 # multiplies the person's height
    x_offset: float              # horizontal offset as a fraction of width
    ground: float                # gap under the feet as a fraction of height


class PartBoxes(NamedTuple):
    """Body-part regions of a rendered person, in image pixels (after mirroring), clipped to the image."""

    head: Box
    torso: Box
    legs: Box


class RenderedImage(NamedTuple):
    """One rendered crop: uint8 pixels (H, W, 3), its part boxes, the visible-body mask, occluded share,
    and what the parsing masks need: the body layout (``None`` for an empty scene), whether the image was
    mirrored, and the occluder's cover (bool (H, W) in image pixels, ``None`` without an occluder)."""

    pixels: np.ndarray
    parts: PartBoxes
    body_mask: np.ndarray        # bool (H, W): body pixels not hidden by an occluder
    occluded_fraction: float     # share of the body's pixels hidden by the occluder (0 if none)
    layout: "BodyLayout | None" = None
    mirrored: bool = False
    occluder_cover: np.ndarray | None = None


@dataclass(frozen=True)
class BodyLayout:
    """Where one image's body pieces go: pixels before mirroring; widths are half widths around the
    (sheared) centre line. ``person_part_boxes`` turns it into head/torso/legs boxes."""

    centre_x: float
    top: float
    bottom: float
    body: float                  # body height
    shear: float
    head_r: float
    shoulder_y: float
    hip_y: float
    shoulder_half: float
    waist_half: float
    leg_half: float
    stride: float
    arm_half: float
    arm_len: float
    swing: float
    torso_reach: float           # half width of arms (+ shoulder bag) around the centre line
    facing: str


class _Item(NamedTuple):
    """One image to write: file name parts and how to render it."""

    split: str
    pid: int                     # name pid: -1 junk, 0 distractor, else the identity's pid
    camera: int                  # 0-based
    frame: int
    bbox: int
    identity_key: int            # index into the world's identity list (-1 for junk backgrounds)
    image_key: tuple[int, ...]   # random-stream key of this image


# ----------------------------------------------------------------------------------------------
# Sampling identities and cameras


def _stream(spec: SyntheticWorldSpec, purpose: int, *keys: int) -> np.random.Generator:
    style_code = STYLES.index(spec.style)
    return np.random.default_rng([spec.seed, style_code, purpose, *keys])


def _hsv(h: float, s: float, v: float) -> Colour:
    return tuple(float(c) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))  # type: ignore[return-value]


def _clothing_colour(rng: np.random.Generator) -> Colour:
    # Real crowds wear many greys/blacks/whites; the rest spread over the hue circle.
    if rng.random() < 0.25:
        grey = float(rng.uniform(0.08, 0.92))
        return (grey, grey, grey)
    return _hsv(rng.random(), rng.uniform(0.45, 1.0), rng.uniform(0.3, 0.95))


def _colour_distance(a: Colour, b: Colour) -> float:
    return float(np.linalg.norm(np.subtract(a, b)))


def _distinct_colour(rng: np.random.Generator, avoid: Colour, min_distance: float = 0.35) -> Colour:
    colour = _clothing_colour(rng)
    for _ in range(20):
        if _colour_distance(colour, avoid) >= min_distance:
            break
        colour = _clothing_colour(rng)
    return colour


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw one person's appearance from ``rng``."""
    upper = _clothing_colour(rng)
    lower = _distinct_colour(rng, upper)
    skin_tone = rng.uniform(0.35, 0.95)
    return Identity(
        upper=upper,
        lower=lower,
        shoes=_hsv(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.05, 0.6)),
        skin=_hsv(0.06, 0.45, skin_tone),
        hair=_hsv(0.08, rng.uniform(0.2, 0.7), rng.uniform(0.05, 0.55)),
        pattern=str(rng.choice(["plain", "plain", "stripes", "vstripes", "checks", "logo"])),
        pattern_colour=_distinct_colour(rng, upper, 0.45),
        pattern_period=float(rng.uniform(0.04, 0.08)),
        height=float(rng.uniform(0.78, 0.93)),
        shoulder=float(rng.uniform(0.085, 0.135)),
        head=float(rng.uniform(0.055, 0.075)),
        legs=float(rng.uniform(0.42, 0.52)),
        long_sleeves=bool(rng.random() < 0.5),
        bag=str(rng.choice(["none", "none", "backpack", "shoulder"])),
        bag_colour=_clothing_colour(rng),
        hat=bool(rng.random() < 0.2),
        hat_colour=_clothing_colour(rng),
    )


# Camera palettes per world style: (background kinds, hue range, saturation, value, gain, cast spread,
# contrast, noise, shear, scale). Style "b" is darker, cooler and more tilted than style "a".
_STYLE_PALETTES = {
    "a": dict(kinds=("gradient", "wall_floor", "tiles", "bars"), hue=(0.0, 0.16), sat=(0.05, 0.45),
              val=(0.45, 0.9), gain=(0.85, 1.2), cast=(1.0, 0.08), contrast=(0.85, 1.1), noise=(0.01, 0.025),
              shear=0.08, scale=(0.9, 1.0)),
    "b": dict(kinds=("texture", "wall_floor", "gradient", "bars"), hue=(0.4, 0.72), sat=(0.15, 0.6),
              val=(0.2, 0.6), gain=(0.65, 0.95), cast=(0.93, 0.1), contrast=(0.7, 0.95), noise=(0.02, 0.04),
              shear=0.14, scale=(0.82, 0.95)),
}


def sample_camera(rng: np.random.Generator, style: str, kind_index: int) -> Camera:
    """Draw one camera of world ``style``; ``kind_index`` cycles the background kinds so cameras differ."""
    palette = _STYLE_PALETTES[style]
    kinds = palette["kinds"]
    hue = rng.uniform(*palette["hue"])
    colour_a = _hsv(hue, rng.uniform(*palette["sat"]), rng.uniform(*palette["val"]))
    colour_b = _hsv(hue + rng.uniform(-0.1, 0.1), rng.uniform(*palette["sat"]), rng.uniform(*palette["val"]))
    cast_mean, cast_spread = palette["cast"]
    cast = tuple(float(c) for c in rng.uniform(cast_mean - cast_spread, cast_mean + cast_spread, size=3))
    if style == "b":   # cool night light: less red, more blue
        cast = (cast[0] * 0.9, cast[1], min(cast[2] * 1.1, 1.25))
    return Camera(
        background=kinds[kind_index % len(kinds)],
        bg_colours=(colour_a, colour_b),
        bg_period=int(rng.integers(6, 16)),
        bg_seed=int(rng.integers(0, 2**31)),
        gain=float(rng.uniform(*palette["gain"])),
        contrast=float(rng.uniform(*palette["contrast"])),
        cast=cast,  # type: ignore[arg-type]
        noise=float(rng.uniform(*palette["noise"])),
        blur=float(rng.uniform(0.3, 0.8)),
        facing="front" if kind_index % 2 == 0 else "back",
        mirrored=bool(rng.random() < 0.5),
        shear=float(rng.uniform(-palette["shear"], palette["shear"])),
        scale=float(rng.uniform(*palette["scale"])),
        x_offset=float(rng.uniform(-0.06, 0.06)),
        ground=float(rng.uniform(0.01, 0.05)),
    )


# ----------------------------------------------------------------------------------------------
# Rendering


class _Grid(NamedTuple):
    y: np.ndarray   # (H, 1) pixel-centre rows
    x: np.ndarray   # (1, W) pixel-centre columns


def _grid(height: int, width: int) -> _Grid:
    return _Grid(np.arange(height, dtype=np.float32)[:, None] + 0.5,
                 np.arange(width, dtype=np.float32)[None, :] + 0.5)


def render_background(camera: Camera, height: int, width: int) -> np.ndarray:
    """The camera's empty scene as float32 (H, W, 3) in [0, 1], before lighting."""
    grid = _grid(height, width)
    colour_a, colour_b = (np.asarray(c, dtype=np.float32) for c in camera.bg_colours)
    rows = np.broadcast_to(grid.y / height, (height, width))[..., None]
    kind = camera.background
    if kind == "gradient":
        image = colour_a * (1 - rows) + colour_b * rows
    elif kind == "wall_floor":
        horizon = rows > 0.62
        image = np.where(horizon, colour_b * (0.8 + 0.3 * rows), colour_a)
    elif kind == "tiles":
        tiles = ((grid.y // camera.bg_period + grid.x // camera.bg_period) % 2)[..., None]
        image = colour_a * (1 - 0.15 * tiles) * (1 - rows * 0.3) + colour_b * rows * 0.3
    elif kind == "bars":
        bars = (((grid.x // camera.bg_period) % 3) == 0)[..., None] & np.ones((height, 1, 1), bool)
        image = np.where(bars, colour_b, colour_a * (0.9 + 0.2 * rows))
    elif kind == "texture":
        rng = np.random.default_rng(camera.bg_seed)
        coarse = rng.random((max(height // 8, 2), max(width // 8, 2))).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
        image = colour_a * (1 - smooth[..., None]) + colour_b * smooth[..., None]
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    return np.ascontiguousarray(image, dtype=np.float32)


def _layout(identity: Identity, camera: Camera, rng: np.random.Generator, height: int, width: int) -> BodyLayout:
    """Place the body for one image: camera framing plus per-image pose and scale jitter."""
    body = identity.height * camera.scale * rng.uniform(0.93, 1.04) * height
    bottom = height * (1.0 - camera.ground) + rng.uniform(-0.015, 0.015) * height
    top = bottom - body
    head_r = identity.head * body
    shoulder_half = identity.shoulder * body
    waist_half = shoulder_half * 0.85
    facing = camera.facing if rng.random() < 0.8 else ("back" if camera.facing == "front" else "front")
    arm_half, swing = 0.3 * shoulder_half, rng.uniform(-0.045, 0.045) * body
    torso_reach = shoulder_half + 1.6 * arm_half + abs(swing)
    if identity.bag == "shoulder":
        torso_reach = max(torso_reach, waist_half + 0.5 * arm_half + 0.1 * body)
    return BodyLayout(
        centre_x=width * (0.5 + camera.x_offset + rng.uniform(-0.05, 0.05)),
        top=top, bottom=bottom, body=body, shear=camera.shear + rng.uniform(-0.02, 0.02),
        head_r=head_r,
        shoulder_y=top + 2 * head_r + 0.025 * body,
        hip_y=bottom - identity.legs * body,
        shoulder_half=shoulder_half, waist_half=waist_half,
        leg_half=0.42 * waist_half,
        stride=rng.uniform(0.0, 0.07) * body,
        arm_half=arm_half,
        arm_len=0.36 * body,
        swing=swing,
        torso_reach=torso_reach,
        facing=facing,
    )


def person_part_boxes(layout: BodyLayout, height: int, width: int, mirrored: bool) -> PartBoxes:
    """Head, torso and legs boxes of a laid-out body, in image pixels (mirrored like the image)."""

    def box(half_width: float, y0: float, y1: float) -> Box:
        # Shear moves rows sideways; the box spans both ends' shifted extents.
        shifts = [layout.shear * (layout.bottom - y) for y in (y0, y1)]
        x0 = layout.centre_x + min(shifts) - half_width
        x1 = layout.centre_x + max(shifts) + half_width
        if mirrored:
            x0, x1 = width - x1, width - x0
        left, top = min(max(math.floor(x0), 0), width), min(max(math.floor(y0), 0), height)
        # Parts outside the crop (junk fragments) become empty boxes rather than inverted ones.
        return left, top, max(min(math.ceil(x1), width), left), max(min(math.ceil(y1), height), top)

    # Extents follow _paint_person: arms and a shoulder bag belong to the torso, the hips overlap the legs.
    torso_bottom = max(layout.hip_y + 0.04 * layout.body, layout.shoulder_y + layout.arm_len)
    leg_reach = max(layout.waist_half * 0.5 + layout.leg_half * 1.15 + layout.stride, layout.waist_half)
    return PartBoxes(
        head=box(layout.head_r * 0.95, layout.top - 0.06 * layout.head_r, layout.shoulder_y),
        torso=box(layout.torso_reach, layout.shoulder_y, torso_bottom),
        legs=box(leg_reach, layout.hip_y - 0.02 * layout.body, layout.bottom),
    )


def _jitter_colour(colour: Colour, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) * rng.uniform(0.93, 1.07, size=3).astype(np.float32), 0, 1)


def _paint_person(canvas: np.ndarray, identity: Identity, layout: BodyLayout, grid: _Grid,
                  rng: np.random.Generator) -> np.ndarray:
    """Draw the body onto ``canvas`` (in place), back to front; return the body mask."""
    y = grid.y
    x = grid.x - layout.centre_x - layout.shear * (layout.bottom - grid.y)   # sheared, centred columns
    body = layout.body
    upper, lower = _jitter_colour(identity.upper, rng), _jitter_colour(identity.lower, rng)
    skin = _jitter_colour(identity.skin, rng)
    mask = np.zeros(canvas.shape[:2], bool)

    def paint(region: np.ndarray, colour: np.ndarray | Colour) -> None:
        canvas[region] = colour
        mask[region] = True

    # Legs (one per side), each a slanted band from the hip to the foot.
    shoe_top = layout.bottom - 0.035 * body
    leg_t = np.clip((y - layout.hip_y) / max(layout.bottom - layout.hip_y, 1.0), 0, 1)
    for side in (-1.0, 1.0):
        centre = side * (0.5 * layout.waist_half + layout.stride * leg_t * (1 if side > 0 else 0.6))
        band = (y >= layout.hip_y - 0.02 * body) & (y < layout.bottom)
        paint(band & (np.abs(x - centre) < layout.leg_half) & (y < shoe_top), lower)
        foot_centre = side * (0.5 * layout.waist_half + layout.stride * (1 if side > 0 else 0.6))
        paint((y >= shoe_top) & (y < layout.bottom) & (np.abs(x - foot_centre) < layout.leg_half * 1.15),
              identity.shoes)
    # Arms, swinging in opposite directions; sleeves short or long, hands in skin tone.
    for side in (-1.0, 1.0):
        arm_t = np.clip((y - layout.shoulder_y) / layout.arm_len, 0, 1)
        centre = side * (layout.shoulder_half + 0.6 * layout.arm_half) + side * layout.swing * arm_t
        arm = (y >= layout.shoulder_y) & (y < layout.shoulder_y + layout.arm_len) & \
              (np.abs(x - centre) < layout.arm_half)
        sleeve_end = layout.shoulder_y + layout.arm_len * (0.85 if identity.long_sleeves else 0.4)
        paint(arm & (y < sleeve_end), upper)
        paint(arm & (y >= sleeve_end), skin)
    # Torso: a trapezoid from the shoulders to just below the hips.
    torso_bottom = layout.hip_y + 0.03 * body
    torso_t = np.clip((y - layout.shoulder_y) / max(torso_bottom - layout.shoulder_y, 1.0), 0, 1)
    half = layout.shoulder_half + (layout.waist_half - layout.shoulder_half) * torso_t
    torso = (y >= layout.shoulder_y) & (y < torso_bottom) & (np.abs(x) < half)
    paint(torso, upper)
    _paint_pattern(canvas, torso, identity, layout, x, y, rng)
    _paint_bag(paint, identity, layout, x, y, rng)
    # Neck and head; the face shows only from the front.
    neck = (y >= layout.top + 1.6 * layout.head_r) & (y < layout.shoulder_y + 1) & \
           (np.abs(x) < layout.head_r * 0.45)
    paint(neck, skin)
    head_cy = layout.top + layout.head_r
    head = ((x / (0.82 * layout.head_r)) ** 2 + ((y - head_cy) / layout.head_r) ** 2) < 1.0
    hair = _jitter_colour(identity.hair, rng)
    if layout.facing == "front":
        paint(head, skin)
        paint(head & (y < head_cy - 0.35 * layout.head_r), hair)
    else:
        paint(head, hair)
    if identity.hat:
        cap = ((x / (0.95 * layout.head_r)) ** 2 + ((y - head_cy) / (1.05 * layout.head_r)) ** 2 < 1.0) & \
              (y < head_cy - 0.2 * layout.head_r)
        paint(cap, _jitter_colour(identity.hat_colour, rng))
    return mask


def _paint_pattern(canvas: np.ndarray, torso: np.ndarray, identity: Identity, layout: BodyLayout,
                   x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> None:
    """Garment pattern on the torso, in body-relative units so it scales with the person."""
    period = identity.pattern_period * layout.body
    u = (y - layout.shoulder_y) / period
    v = x / period + 100.0   # offset keeps floor() away from the sign change at the centre line
    if identity.pattern == "stripes":
        marks = np.floor(u) % 2 == 1
    elif identity.pattern == "vstripes":
        marks = np.floor(v) % 2 == 1
    elif identity.pattern == "checks":
        marks = (np.floor(u) + np.floor(v)) % 2 == 1
    elif identity.pattern == "logo" and layout.facing == "front":
        chest_y = layout.shoulder_y + 0.3 * (layout.hip_y - layout.shoulder_y)
        marks = (x - 0.35 * layout.shoulder_half) ** 2 + (y - chest_y) ** 2 < (0.055 * layout.body) ** 2
    else:
        return
    canvas[torso & marks] = _jitter_colour(identity.pattern_colour, rng)


def _paint_bag(paint, identity: Identity, layout: BodyLayout, x: np.ndarray, y: np.ndarray,
               rng: np.random.Generator) -> None:
    """Backpack (full from the back, straps from the front) or shoulder bag (side swaps with facing)."""
    colour = _jitter_colour(identity.bag_colour, rng)
    torso_len = layout.hip_y - layout.shoulder_y
    if identity.bag == "backpack":
        if layout.facing == "back":
            paint((np.abs(x) < 0.8 * layout.shoulder_half) & (y >= layout.shoulder_y + 0.05 * torso_len) &
                  (y < layout.shoulder_y + 0.75 * torso_len), colour)
        else:
            for side in (-1.0, 1.0):
                paint((np.abs(x - side * 0.55 * layout.shoulder_half) < 0.012 * layout.body + 0.5) &
                      (y >= layout.shoulder_y) & (y < layout.shoulder_y + 0.6 * torso_len), colour)
    elif identity.bag == "shoulder":
        side = 1.0 if layout.facing == "front" else -1.0
        inner = layout.waist_half + 0.5 * layout.arm_half
        across = side * x
        paint((across >= inner) & (across < inner + 0.1 * layout.body) &
              (y >= layout.hip_y - 0.12 * layout.body) & (y < layout.hip_y + 0.04 * layout.body), colour)


def _apply_lighting(scene: np.ndarray, camera: Camera, rng: np.random.Generator) -> np.ndarray:
    """Camera contrast, gain, colour cast and noise, plus small per-image brightness changes -> uint8."""
    gain = camera.gain * rng.uniform(0.94, 1.06)
    cast = np.asarray(camera.cast, np.float32) * gain
    lit = ((scene - 0.5) * camera.contrast + 0.5) * cast
    lit += rng.standard_normal(lit.shape, dtype=np.float32) * np.float32(camera.noise)
    pixels = np.clip(lit * 255.0 + 0.5, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(camera.blur))
    out = np.asarray(image)
    return out[:, ::-1] if camera.mirrored else out


def _composite(canvas: np.ndarray, rgba: np.ndarray, left: int, top: int) -> np.ndarray:
    """Alpha-blend ``rgba`` onto ``canvas`` (in place) at (left, top); return its alpha (H, W) on the canvas."""
    height, width = canvas.shape[:2]
    cover = np.zeros((height, width), np.float32)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + rgba.shape[0], height), min(left + rgba.shape[1], width)
    if y1 <= y0 or x1 <= x0:
        return cover
    piece = rgba[y0 - top:y1 - top, x0 - left:x1 - left].astype(np.float32) / 255.0
    alpha = piece[..., 3:4]
    canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - alpha) + piece[..., :3] * alpha
    cover[y0:y1, x0:x1] = alpha[..., 0]
    return cover


def render_image(identity: Identity | None, camera: Camera, rng: np.random.Generator, height: int, width: int,
                 occluder: np.ndarray | None = None, occlusion_rng: np.random.Generator | None = None,
                 background: np.ndarray | None = None) -> RenderedImage:
    """Render one crop of ``identity`` (``None``: empty scene) seen by ``camera``.

    ``rng`` drives pose/lighting jitter; with an ``occluder`` (RGBA uint8) it is pasted over 20-50% of
    the body using ``occlusion_rng``. The same ``rng`` state with and without an occluder gives the same
    person, pose and lighting, so the two images differ only around the occluder.
    """
    grid = _grid(height, width)
    canvas = (background if background is not None else render_background(camera, height, width)).copy()
    layout = _layout(identity, camera, rng, height, width) if identity is not None else None
    body = _paint_person(canvas, identity, layout, grid, rng) if identity is not None else \
        np.zeros((height, width), bool)
    occluded = 0.0
    visible = body
    cover = None
    if occluder is not None:
        if occlusion_rng is None:
            raise ValueError("render_image: an occluder needs occlusion_rng")
        cover = _place_occluder(canvas, body, occluder, occlusion_rng) > 0.5
        hidden = body & cover
        occluded = float(hidden.sum() / max(body.sum(), 1))
        visible = body & ~hidden
    pixels = _apply_lighting(canvas, camera, rng)
    if layout is None:
        empty = (0, 0, 0, 0)
        parts = PartBoxes(empty, empty, empty)
    else:
        parts = person_part_boxes(layout, height, width, camera.mirrored)
    if camera.mirrored:
        visible = visible[:, ::-1]
        cover = cover[:, ::-1] if cover is not None else None
    cover = np.ascontiguousarray(cover) if cover is not None else None
    return RenderedImage(np.ascontiguousarray(pixels), parts, np.ascontiguousarray(visible), occluded, layout,
                         camera.mirrored, cover)


# ----------------------------------------------------------------------------------------------
# Occluders


def render_occluder(kind: str, rng: np.random.Generator) -> np.ndarray:
    """An RGBA uint8 cut-out of an occluding object of ``kind`` (one of ``OCCLUDER_KINDS``)."""
    shapes = {"box": (48, 48), "pole": (128, 12), "car": (56, 112), "person": (112, 44), "bush": (56, 72)}
    if kind not in shapes:
        raise ValueError(f"unknown occluder kind {kind!r}; expected one of {OCCLUDER_KINDS}")
    height, width = shapes[kind]
    grid = _grid(height, width)
    y, x = grid.y / height, grid.x / width            # unit coordinates
    rgb = np.zeros((height, width, 3), np.float32)
    alpha = np.zeros((height, width), bool)

    def paint(region: np.ndarray, colour: Sequence[float]) -> None:
        region = np.broadcast_to(region, alpha.shape)
        rgb[region] = colour
        alpha[region] = True

    colour = np.asarray(_clothing_colour(rng), np.float32)
    if kind == "box":
        full = np.ones((height, width), bool)
        paint(full, colour * 0.8)
        paint((np.abs(x - 0.5) < 0.42) & (np.abs(y - 0.5) < 0.42), colour)
        paint(np.abs(x - y) < 0.05, colour * 0.7)                       # a diagonal plank
    elif kind == "pole":
        paint(np.ones((height, width), bool), colour * 0.6 + 0.3)
        paint((np.floor(y * 10) % 3 == 0) & np.ones_like(x, bool), colour)  # painted bands
    elif kind == "car":
        paint((y > 0.4) & (y < 0.85) & (x > 0.02) & (x < 0.98), colour)
        paint((y > 0.08) & (y <= 0.42) & (np.abs(x - 0.5) < 0.3 - (0.42 - y) * 0.4), colour * 0.9)
        paint((y > 0.14) & (y <= 0.38) & (np.abs(x - 0.5) < 0.24 - (0.42 - y) * 0.4), (0.55, 0.7, 0.85))
        for wheel_x in (0.22, 0.78):
            paint(((x - wheel_x) * width) ** 2 + ((y - 0.84) * height) ** 2 < (0.14 * height) ** 2,
                  (0.05, 0.05, 0.05))
    elif kind == "person":
        paint(((x - 0.5) / 0.2) ** 2 + ((y - 0.08) / 0.075) ** 2 < 1, _hsv(0.06, 0.45, rng.uniform(0.4, 0.9)))
        paint((np.abs(x - 0.5) < 0.45 - 0.1 * y) & (y > 0.15) & (y < 0.55), colour)
        paint((np.abs(np.abs(x - 0.5) - 0.17) < 0.13) & (y >= 0.55) & (y < 0.98),
              _clothing_colour(rng))
    elif kind == "bush":
        for _ in range(7):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.35, 0.75), rng.uniform(0.18, 0.3)
            paint(((x - cx) * width) ** 2 + ((y - cy) * height) ** 2 < (r * height) ** 2,
                  _hsv(rng.uniform(0.22, 0.38), rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.55)))
        paint((y > 0.7) & (np.abs(x - 0.5) < 0.45), (0.25, 0.18, 0.1))    # planter
    out = np.zeros((height, width, 4), np.uint8)
    out[..., :3] = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
    out[..., 3] = alpha.astype(np.uint8) * 255
    return out


def _resized(rgba: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rgba).resize((max(width, 1), max(height, 1)), Image.Resampling.NEAREST))


def _occluder_candidate(occluder: np.ndarray, rows: np.ndarray, cols: np.ndarray, canvas_hw: tuple[int, int],
                        rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """Scale and place an occluder near the body: ground objects from below, others across it."""
    height, width = canvas_hw
    body_top, body_bottom = rows.min(), rows.max() + 1
    body_left, body_right = cols.min(), cols.max() + 1
    body_h, body_w = body_bottom - body_top, body_right - body_left
    aspect = occluder.shape[1] / occluder.shape[0]
    tall = occluder.shape[0] > 1.5 * occluder.shape[1]
    if tall:   # poles and standing people: full height, width decides the coverage
        occ_h = int(body_h * rng.uniform(0.9, 1.15))
        occ_w = int(body_w * rng.uniform(0.25, 0.8))
        top = int(body_bottom - occ_h + rng.integers(-2, 3))
        left = int(rng.integers(body_left - occ_w // 3, max(body_right - occ_w // 2, body_left - occ_w // 3 + 1)))
    else:      # boxes, cars, bushes stand on the ground and hide the lower body
        occ_h = int(body_h * rng.uniform(0.3, 0.6))
        occ_w = int(max(occ_h * aspect, body_w * rng.uniform(0.6, 1.3)))
        top = int(height - occ_h + rng.integers(0, 4))
        left = int((body_left + body_right) / 2 - occ_w / 2 + rng.uniform(-0.3, 0.3) * body_w)
    return _resized(occluder, occ_h, occ_w), left, top


def _place_occluder(canvas: np.ndarray, body: np.ndarray, occluder: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paste ``occluder`` so that it hides 20-50% of ``body``; return the pasted alpha (H, W).

    Random placements are tried first; if none lands in range, a ground-standing crate is sized from the
    body's row profile so that the hidden share is ~35% (always within range).
    """
    low, high = QUERY_OCCLUSION_RANGE
    rows, cols = np.nonzero(body)
    if rows.size == 0:
        raise ValueError("cannot occlude an image without a body")
    total = rows.size
    for _ in range(30):
        piece, left, top = _occluder_candidate(occluder, rows, cols, canvas.shape[:2], rng)
        cover = _alpha_on_canvas(piece, left, top, canvas.shape[:2])
        share = float((body & (cover > 0.5)).sum()) / total
        if low + 0.01 <= share <= high - 0.01:
            return _composite(canvas, piece, left, top)
    # Fallback: an opaque crate from the ground up to the row above which 65% of the body lies.
    cumulative_below = np.cumsum(np.bincount(rows, minlength=canvas.shape[0])[::-1])[::-1]
    cut = int(np.nonzero(cumulative_below >= 0.35 * total)[0].max())
    crate = _resized(occluder, canvas.shape[0] - cut, canvas.shape[1]).copy()
    crate[..., 3] = 255
    return _composite(canvas, crate, 0, cut)


def _alpha_on_canvas(rgba: np.ndarray, left: int, top: int, canvas_hw: tuple[int, int]) -> np.ndarray:
    height, width = canvas_hw
    cover = np.zeros((height, width), np.float32)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + rgba.shape[0], height), min(left + rgba.shape[1], width)
    if y1 > y0 and x1 > x0:
        cover[y0:y1, x0:x1] = rgba[y0 - top:y1 - top, x0 - left:x1 - left, 3] / 255.0
    return cover


# ----------------------------------------------------------------------------------------------
# Parsing masks (BPBReID format): PifPaf-like confidence fields drawn from the known body layout

# Which side of the (un-mirrored) canvas a person's left limbs are on: seen from the front, their left
# is on the image's right.
_LEFT_SIDE = {"front": 1.0, "back": -1.0}
_FACE_FIELDS = frozenset({"nose", "left_eye", "right_eye", "left_eye_to_right_eye", "nose_to_left_eye",
                          "nose_to_right_eye"})


def _skeleton(layout: BodyLayout) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """Keypoints as (x offset from the sheared centre line, y) and each field's flat-top radius in pixels."""
    left = _LEFT_SIDE[layout.facing]
    head_cy = layout.top + layout.head_r
    arm_x = layout.shoulder_half + 0.6 * layout.arm_half
    knee_y = layout.hip_y + 0.5 * (layout.bottom - layout.hip_y)
    points: dict[str, tuple[float, float]] = {
        "nose": (0.0, head_cy + 0.15 * layout.head_r),
    }
    radius = {"nose": 0.3 * layout.head_r}
    for name, side in (("left", left), ("right", -left)):
        stride = layout.stride * (1.0 if side > 0 else 0.6)
        points.update({
            f"{name}_eye": (side * 0.29 * layout.head_r, head_cy - 0.1 * layout.head_r),
            f"{name}_ear": (side * 0.82 * layout.head_r, head_cy),
            f"{name}_shoulder": (side * layout.shoulder_half, layout.shoulder_y),
            f"{name}_elbow": (side * (arm_x + 0.5 * layout.swing), layout.shoulder_y + 0.5 * layout.arm_len),
            f"{name}_wrist": (side * (arm_x + layout.swing), layout.shoulder_y + layout.arm_len),
            f"{name}_hip": (side * 0.5 * layout.waist_half, layout.hip_y),
            f"{name}_knee": (side * (0.5 * layout.waist_half + 0.5 * stride), knee_y),
            f"{name}_ankle": (side * (0.5 * layout.waist_half + stride), layout.bottom - 0.03 * layout.body),
        })
        radius.update({f"{name}_eye": 0.25 * layout.head_r, f"{name}_ear": 0.3 * layout.head_r,
                       f"{name}_shoulder": layout.arm_half, f"{name}_elbow": layout.arm_half,
                       f"{name}_wrist": layout.arm_half, f"{name}_hip": layout.leg_half,
                       f"{name}_knee": layout.leg_half, f"{name}_ankle": 1.15 * layout.leg_half})
    torso_len = layout.hip_y - layout.shoulder_y
    for joint in masks.PIFPAF_JOINTS:
        start, end = joint.split("_to_")
        if "shoulder" in start and "hip" in end:
            radius[joint] = 0.6 * layout.shoulder_half       # the torso sides cover its inside
        elif start.endswith("shoulder") and end.endswith("shoulder"):
            radius[joint] = 0.12 * torso_len
        elif start.endswith("hip") and end.endswith("hip"):
            radius[joint] = 0.15 * torso_len
        elif "ear" in start or "eye" in start or "nose" in start:
            radius[joint] = 0.3 * layout.head_r
        elif "knee" in joint or "ankle" in joint:
            radius[joint] = layout.leg_half
        else:
            radius[joint] = layout.arm_half
    return points, radius


def _segment_distance(px: np.ndarray, py: np.ndarray, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    length = dx * dx + dy * dy
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / length, 0.0, 1.0) if length > 0 else 0.0
    return np.hypot(px - (ax + t * dx), py - (ay + t * dy))


def pifpaf_fields(layout: BodyLayout | None, height: int, width: int, mirrored: bool,
                  cover: np.ndarray | None = None, stride: int = MASK_STRIDE) -> np.ndarray:
    """The ``(36, height // stride, width // stride)`` float32 confidence fields of one rendered person.

    Each keypoint field is 1 within the body piece's radius of the keypoint and falls off as a Gaussian
    beyond it; each joint field does the same around the segment between its two keypoints. Face fields
    are 0 for a person seen from the back. With an occluder ``cover`` (bool (H, W), image pixels), every
    field is scaled by the uncovered share of each cell, and a keypoint whose own pixel is covered gets
    no field at all (the detector would not see it). ``layout=None`` (empty scene) gives all zeros.
    """
    rows, cols = height // stride, width // stride
    fields = np.zeros((masks.NUM_PIFPAF_FIELDS, rows, cols), np.float32)
    if layout is None:
        return fields
    cell_h, cell_w = height / rows, width / cols
    y = (np.arange(rows, dtype=np.float64)[:, None] + 0.5) * cell_h
    x = (np.arange(cols, dtype=np.float64)[None, :] + 0.5) * cell_w
    u = x - layout.centre_x - layout.shear * (layout.bottom - y)       # body-relative columns, as painted
    points, radius = _skeleton(layout)
    sigma = 0.015 * layout.body + 0.5
    for index, name in enumerate(masks.PIFPAF_FIELDS):
        if layout.facing == "back" and name in _FACE_FIELDS:
            continue
        if "_to_" in name:
            start, end = name.split("_to_")
            distance = _segment_distance(u, y, points[start], points[end])
        else:
            distance = np.hypot(u - points[name][0], y - points[name][1])
        fields[index] = np.exp(-0.5 * (np.maximum(distance - radius[name], 0.0) / sigma) ** 2)
    if mirrored:
        fields = fields[:, :, ::-1]
    if cover is not None:
        fields = fields * _uncovered_share(cover, rows, cols)
        for index, name in enumerate(masks.PIFPAF_KEYPOINTS):
            px, py = _image_point(layout, points[name], width, mirrored)
            if 0 <= py < height and 0 <= px < width and cover[int(py), int(px)]:
                fields[index] = 0.0
    return np.ascontiguousarray(fields, dtype=np.float32)


def _image_point(layout: BodyLayout, point: tuple[float, float], width: int, mirrored: bool) -> tuple[float, float]:
    offset, y = point
    x = layout.centre_x + layout.shear * (layout.bottom - y) + offset
    return (width - x if mirrored else x), y


def _uncovered_share(cover: np.ndarray, rows: int, cols: int) -> np.ndarray:
    height, width = cover.shape
    cropped = cover[: rows * (height // rows), : cols * (width // cols)]
    blocks = cropped.reshape(rows, height // rows, cols, width // cols)
    return (1.0 - blocks.mean(axis=(1, 3))).astype(np.float32)


def image_fields(image: RenderedImage, stride: int = MASK_STRIDE) -> np.ndarray:
    """:func:`pifpaf_fields` of a :func:`render_image` result."""
    height, width = image.body_mask.shape
    return pifpaf_fields(image.layout, height, width, image.mirrored, image.occluder_cover, stride)


def world_mask_path(subset_root: Path, split_folder: str, image_name: str) -> Path:
    """Where the world writes the mask of ``subset_root/split_folder/image_name`` (BPBReID layout)."""
    return masks.mask_path(subset_root / split_folder / image_name, WORLD_MASKS_DIR, ".npy")


# ----------------------------------------------------------------------------------------------
# World layout: which images exist


def _market_name(pid: int, camera: int, frame: int, bbox: int) -> str:
    pid_text = "-1" if pid == -1 else f"{pid:04d}"   # Market writes junk as "-1_c...", not "-001"
    return f"{pid_text}_c{camera + 1}s1_{frame:06d}_{bbox:02d}.jpg"


def _assign_pids(spec: SyntheticWorldSpec) -> tuple[list[int], list[int]]:
    """Non-contiguous, interleaved pids (like Market) so readers must relabel the train split."""
    total = spec.num_train_ids + spec.num_test_ids
    rng = _stream(spec, _STREAM_PIDS)
    pids = np.sort(rng.choice(np.arange(1, min(2 * total + 2, 9999)), size=total, replace=False))
    order = rng.permutation(total)
    train = sorted(int(p) for p in pids[order[:spec.num_train_ids]])
    test = sorted(int(p) for p in pids[order[spec.num_train_ids:]])
    return train, test


def _camera_counts(spec: SyntheticWorldSpec, rng: np.random.Generator) -> dict[int, int]:
    """Cameras an identity appears in (at least two) and how many images in each."""
    num_seen = int(rng.integers(2, spec.num_cameras + 1))
    cameras = sorted(int(c) for c in rng.choice(spec.num_cameras, size=num_seen, replace=False))
    mean = spec.images_per_id_per_camera
    return {camera: int(rng.integers(1, 2 * mean)) if mean > 1 else 1 for camera in cameras}


def _plan_items(spec: SyntheticWorldSpec) -> tuple[list[_Item], int]:
    """Every labelled image of the world, in writing order; returns (items, number of identities)."""
    train_pids, test_pids = _assign_pids(spec)
    next_frame = [int(f) for f in _stream(spec, _STREAM_LAYOUT, 0).integers(100, 2000, size=spec.num_cameras)]
    items: list[_Item] = []

    def add(split: str, pid: int, camera: int, identity_key: int, layout_rng: np.random.Generator) -> None:
        next_frame[camera] += int(layout_rng.integers(1, 40))
        key = (identity_key + 1, camera, len(items))
        items.append(_Item(split, pid, camera, next_frame[camera], int(layout_rng.integers(1, 4)),
                           identity_key, key))

    for key, pid in enumerate(train_pids):
        rng = _stream(spec, _STREAM_LAYOUT, 1, key)
        for camera, count in _camera_counts(spec, rng).items():
            for _ in range(count):
                add("train", pid, camera, key, rng)
    for offset, pid in enumerate(test_pids):
        key = len(train_pids) + offset
        rng = _stream(spec, _STREAM_LAYOUT, 2, offset)
        counts = _camera_counts(spec, rng)
        num_query_cams = int(rng.integers(1, min(2, len(counts) - 1) + 1))
        query_cams = rng.choice(sorted(counts), size=num_query_cams, replace=False)
        for camera in sorted(int(c) for c in query_cams):
            for _ in range(1 + int(rng.random() < 0.3)):
                add("query", pid, camera, key, rng)
        for camera, count in counts.items():
            for _ in range(count):
                add("gallery", pid, camera, key, rng)
    rng = _stream(spec, _STREAM_LAYOUT, 3)
    num_ids = len(train_pids) + len(test_pids)
    for index in range(spec.num_distractors):   # people outside the test set, pid 0
        add("gallery", 0, int(rng.integers(spec.num_cameras)), num_ids + index, rng)
    num_ids += spec.num_distractors
    for _ in range(spec.num_junk):              # bad detections, pid -1: empty scenes or body fragments
        add("gallery", -1, int(rng.integers(spec.num_cameras)), -1 if rng.random() < 0.5 else 0, rng)
    return items, num_ids


# ----------------------------------------------------------------------------------------------
# Writing


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _split_counts(items: Sequence[_Item]) -> dict[str, dict[str, int]]:
    """What a Market reader reports: junk (-1) dropped, distractors (0) kept."""
    counts = {}
    for split in SPLIT_FOLDERS:
        kept = [item for item in items if item.split == split and item.pid != -1]
        counts[split] = {"ids": len({item.pid for item in kept}), "images": len(kept),
                         "cameras": len({item.camera for item in kept})}
    counts["gallery_distractor_images"] = sum(item.pid == 0 for item in items)
    counts["junk_images"] = sum(item.pid == -1 for item in items)
    return counts


class _World:
    """The sampled identities, cameras and occluders of one spec, with cached backgrounds."""

    def __init__(self, spec: SyntheticWorldSpec, num_identities: int):
        self.spec = spec
        self.identities = [sample_identity(_stream(spec, _STREAM_IDENTITY, key)) for key in range(num_identities)]
        self.cameras = [sample_camera(_stream(spec, _STREAM_CAMERA, index), spec.style, index)
                        for index in range(spec.num_cameras)]
        self.backgrounds = [render_background(camera, spec.height, spec.width) for camera in self.cameras]
        self.occluders = [render_occluder(OCCLUDER_KINDS[index % len(OCCLUDER_KINDS)],
                                          _stream(spec, _STREAM_OCCLUDER, index))
                          for index in range(spec.num_occluders)]

    def render(self, item: _Item, occlude: bool) -> RenderedImage:
        spec = self.spec
        camera = self.cameras[item.camera]
        rng = _stream(spec, _STREAM_IMAGE, *item.image_key)
        identity = self._identity_for(item, rng)
        occluder = occlusion_rng = None
        if occlude and identity is not None:
            occlusion_rng = _stream(spec, _STREAM_OCCLUSION, *item.image_key)
            occluder = self.occluders[int(occlusion_rng.integers(len(self.occluders)))]
        return render_image(identity, camera, rng, spec.height, spec.width, occluder, occlusion_rng,
                            self.backgrounds[item.camera])

    def _identity_for(self, item: _Item, rng: np.random.Generator) -> Identity | None:
        if item.pid != -1:
            return self.identities[item.identity_key]
        if item.identity_key == -1:
            return None
        # Junk body fragment: a random person framed far too large, so only part of the body shows.
        person = sample_identity(rng)
        return dataclasses.replace(person, height=float(rng.uniform(1.6, 2.2)))


def _occlusion_plan(spec: SyntheticWorldSpec, items: Sequence[_Item]) -> list[bool]:
    """Occluded-Duke design: every query, and ~10% of the other labelled images (never junk)."""
    rng = _stream(spec, _STREAM_OCCLUSION, 0)
    draws = rng.random(len(items))
    return [item.pid != -1 and (item.split == "query" or bool(draw < OTHER_OCCLUSION_RATE))
            for item, draw in zip(items, draws)]


def _write_market(world: _World, items: Sequence[_Item], root: Path, occluded_root: Path | None) -> dict:
    for folder in SPLIT_FOLDERS.values():
        (root / folder).mkdir(parents=True)
        if occluded_root is not None:
            (occluded_root / folder).mkdir(parents=True)
    plan = _occlusion_plan(world.spec, items)
    occluded_counts = {split: 0 for split in SPLIT_FOLDERS}
    for item, occlude in zip(items, plan):
        name = _market_name(item.pid, item.camera, item.frame, item.bbox)
        folder = SPLIT_FOLDERS[item.split]
        rendered = world.render(item, occlude=False)
        holistic = _jpeg_bytes(rendered.pixels)
        (root / folder / name).write_bytes(holistic)
        holistic_fields = image_fields(rendered)
        masks.write_pifpaf_fields(world_mask_path(root, folder, name), holistic_fields)
        if occluded_root is None:
            continue
        occluded_fields = holistic_fields
        data = holistic
        if occlude:
            hidden = world.render(item, occlude=True)
            data, occluded_fields = _jpeg_bytes(hidden.pixels), image_fields(hidden)
        occluded_counts[item.split] += int(occlude)
        (occluded_root / folder / name).write_bytes(data)
        masks.write_pifpaf_fields(world_mask_path(occluded_root, folder, name), occluded_fields)
    counts = {"market": _split_counts(items)}
    if occluded_root is not None:
        counts["market_occluded"] = {**_split_counts(items), "occluded_images": occluded_counts}
    return counts


def _write_occluders(world: _World, folder: Path) -> dict:
    folder.mkdir(parents=True)
    for index, rgba in enumerate(world.occluders):
        kind = OCCLUDER_KINDS[index % len(OCCLUDER_KINDS)]
        Image.fromarray(rgba).save(folder / f"{kind}_{index:03d}.png")
    return {"images": len(world.occluders), "kinds": list(OCCLUDER_KINDS)}


_POOL_IMAGES_PER_ID = 4
_POOL_IDS_PER_VIDEO = 5


def _write_pool(spec: SyntheticWorldSpec, folder: Path) -> dict:
    """Unlabeled crops of people never seen in train/test, grouped in per-video folders with their own scenes."""
    folder.mkdir(parents=True)
    written = 0
    num_ids = math.ceil(spec.pool_size / _POOL_IMAGES_PER_ID)
    num_videos = math.ceil(num_ids / _POOL_IDS_PER_VIDEO)
    for video in range(num_videos):
        video_rng = _stream(spec, _STREAM_POOL, video)
        camera = sample_camera(video_rng, spec.style, int(video_rng.integers(0, 4)))
        background = render_background(camera, spec.height, spec.width)
        video_folder = folder / f"video_{video:03d}"
        video_folder.mkdir()
        for person in range(_POOL_IDS_PER_VIDEO):
            identity = sample_identity(_stream(spec, _STREAM_POOL, video, person + 1))
            for shot in range(_POOL_IMAGES_PER_ID):
                if written == spec.pool_size:
                    break
                rng = _stream(spec, _STREAM_POOL, video, person + 1, shot + 1)
                image = render_image(identity, camera, rng, spec.height, spec.width, background=background)
                (video_folder / f"{video:03d}_{person:02d}_{shot:02d}.jpg").write_bytes(_jpeg_bytes(image.pixels))
                written += 1
    return {"images": written, "folders": num_videos if written else 0}


def _generate(spec: SyntheticWorldSpec, out_dir: Path) -> dict:
    items, num_identities = _plan_items(spec)
    world = _World(spec, num_identities)
    counts = _write_market(world, items, out_dir / "market",
                           out_dir / "market_occluded" if spec.occluded else None)
    if spec.occluded:
        counts["market_occluded"]["tsd_split"] = write_occlusion_split(spec, out_dir / "market_occluded")
    counts["occluders"] = _write_occluders(world, out_dir / "occluders")
    counts["pool"] = _write_pool(spec, out_dir / "pool")
    return counts


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _resolve_spec(spec: SyntheticWorldSpec | None, overrides: dict) -> SyntheticWorldSpec:
    spec = spec or SyntheticWorldSpec()
    known = {field.name for field in dataclasses.fields(SyntheticWorldSpec)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"generate_world: unknown spec field(s) {unknown}; valid fields: {sorted(known)}")
    return dataclasses.replace(spec, **overrides)


def generate_world(out_dir: str | os.PathLike, spec: SyntheticWorldSpec | None = None, **overrides) -> Path:
    """Render the world described by ``spec`` (with ``overrides`` applied) into ``out_dir``; return it.

    Idempotent: when ``out_dir/world.json`` already records the same spec and generator version, nothing is
    written. Otherwise this function's own outputs (``market``, ``market_occluded``, ``occluders``, ``pool``,
    ``world.json``) are deleted and regenerated; anything else in ``out_dir`` is left alone. A file lock
    makes concurrent calls (several ranks or test workers) generate once.
    """
    spec = _resolve_spec(spec, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "world.json"
    wanted = {"generator_version": GENERATOR_VERSION, "spec": dataclasses.asdict(spec)}
    with open(out / ".world.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = _read_manifest(manifest_path)
        if manifest is not None and {k: manifest.get(k) for k in wanted} == wanted:
            return out
        for name in OWN_OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        counts = _generate(spec, out)
        # written last: a half-written world is regenerated next time
        atomic_write_text(manifest_path, json.dumps({**wanted, "counts": counts}, indent=2, sort_keys=True) + "\n")
    return out


# ----------------------------------------------------------------------------------------------
# TSD-style occlusion labels (TSD: utils/metrics_new.py): derived from the plan, nothing rendered


TSD_SPLIT_FILES = ("new_query.txt", "new_gallery.txt")
NTP_OCCLUDER_KINDS = ("person",)   # a pasted person = non-target pedestrian (label 1); other kinds = objects (2)


def occlusion_records(spec: SyntheticWorldSpec) -> list[tuple[str, str, int, int, int]]:
    """``(split folder, file name, pid, camera, label)`` of every labelled image of ``market_occluded/``, label
    0 = holistic, 1 = occluded by a person cut-out (NTP), 2 = occluded by an object cut-out (NPO).

    Replays the plan and the occluder draw of :meth:`_World.render` (the first draw of the image's occlusion
    stream), so the labels are those of the images the world wrote, without rendering anything."""
    items, _ = _plan_items(spec)
    records = []
    for item, occlude in zip(items, _occlusion_plan(spec, items)):
        if item.pid == -1:
            continue
        label = 0
        if occlude:
            index = int(_stream(spec, _STREAM_OCCLUSION, *item.image_key).integers(spec.num_occluders))
            label = 1 if OCCLUDER_KINDS[index % len(OCCLUDER_KINDS)] in NTP_OCCLUDER_KINDS else 2
        records.append((SPLIT_FOLDERS[item.split], _market_name(item.pid, item.camera, item.frame, item.bbox),
                        item.pid, item.camera, label))
    return records


def write_occlusion_split(spec: SyntheticWorldSpec, target: Path) -> dict[str, int]:
    """Write TSD's holistic-query split of ``spec``'s occluded subset into ``target`` (``new_query.txt``,
    ``new_gallery.txt``; part of every world with ``market_occluded/``) and return its sizes. Queries: the
    first holistic gallery image of each test identity in each camera; gallery: every gallery image (those
    queries labelled 3) plus the original, all occluded, queries. The images are not touched."""
    chosen: set[tuple[int, int]] = set()
    queries, gallery = [], []
    records = occlusion_records(spec)
    for folder, name, pid, camera, label in records:
        if folder != SPLIT_FOLDERS["gallery"]:
            continue
        relative = f"{folder}/{name}"
        if pid > 0 and label == 0 and (pid, camera) not in chosen:
            chosen.add((pid, camera))
            queries.append(relative)
            label = 3
        gallery.append(f"{relative},{label}")
    gallery += [f"{folder}/{name},{label}" for folder, name, _, _, label in records
                if folder == SPLIT_FOLDERS["query"]]
    for file_name, lines in zip(TSD_SPLIT_FILES, (queries, gallery)):
        (target / file_name).write_text("\n".join(lines) + "\n")
    return {"queries": len(queries), "gallery": len(gallery)}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m passreid.demo.world --out DIR [--seed N] [--style b] ...``."""
    parser = argparse.ArgumentParser(description="Render the synthetic re-ID world (Market-1501 layout).")
    parser.add_argument("--out", required=True, help="output folder (market/, market_occluded/, pool/, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", choices=STYLES, default="a")
    parser.add_argument("--num-train-ids", type=int, default=SyntheticWorldSpec.num_train_ids)
    parser.add_argument("--num-test-ids", type=int, default=SyntheticWorldSpec.num_test_ids)
    parser.add_argument("--num-cameras", type=int, default=SyntheticWorldSpec.num_cameras)
    parser.add_argument("--pool-size", type=int, default=SyntheticWorldSpec.pool_size)
    parser.add_argument("--no-occluded", action="store_true", help="skip market_occluded/")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = generate_world(args.out, seed=args.seed, style=args.style, num_train_ids=args.num_train_ids,
                         num_test_ids=args.num_test_ids, num_cameras=args.num_cameras,
                         pool_size=args.pool_size, occluded=not args.no_occluded)
    counts = json.loads((out / "world.json").read_text())["counts"]
    print(f"world in {out} ({time.perf_counter() - start:.1f} s)")
    for split in SPLIT_FOLDERS:
        stats = counts["market"][split]
        print(f"  {split:8s} ids {stats['ids']:5d}  images {stats['images']:6d}  cameras {stats['cameras']}")
    print(f"  pool     images {counts['pool']['images']} in {counts['pool']['folders']} folders; "
          f"occluders {counts['occluders']['images']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
