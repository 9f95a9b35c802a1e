"""TransReID-family train transform, test transform and the pixel-mode RandomErasing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as F

from passreid.data.transforms import RandomErasing, build_test_transform, build_train_transform

SIZE = (256, 128)


def _random_image(height=128, width=64, seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _normalised(image: Image.Image) -> torch.Tensor:
    return (F.to_tensor(image) - 0.5) / 0.5


def test_train_transform_shape_dtype_and_determinism():
    transform = build_train_transform(SIZE)
    image = _random_image()
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(0)
    second = transform(image)
    torch.manual_seed(1)
    other = transform(image)
    assert first.shape == (3, *SIZE) and first.dtype == torch.float32
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_train_transform_without_randomness_is_bicubic_resize_and_normalise():
    image = _random_image()
    transform = build_train_transform(SIZE, flip_p=0.0, padding=0, erasing_p=0.0)
    expected = _normalised(image.resize((SIZE[1], SIZE[0]), Image.Resampling.BICUBIC))
    assert torch.allclose(transform(image), expected, atol=1e-6)


def test_train_transform_pads_with_zero_and_crops_back():
    image = _random_image(*SIZE)     # already at size: resize is the identity
    base = _normalised(image)
    transform = build_train_transform(SIZE, flip_p=0.0, padding=10, erasing_p=0.0)
    padded = torch.full((3, SIZE[0] + 20, SIZE[1] + 20), -1.0)     # pixel 0 normalises to -1
    padded[:, 10:-10, 10:-10] = base
    shifts = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = transform(image)
        matches = [(top, left) for top in range(21) for left in range(21)
                   if torch.equal(out, padded[:, top:top + SIZE[0], left:left + SIZE[1]])]
        assert matches, "output is not a crop of the zero-padded image"
        shifts.add(matches[0])
    assert len(shifts) > 6, "crop offsets should vary"


def test_flip_probability():
    small = (32, 16)
    image = _random_image(*small)
    plain = _normalised(image)
    flipped = torch.flip(plain, dims=[2])
    transform = build_train_transform(small, flip_p=0.5, padding=0, erasing_p=0.0)
    torch.manual_seed(0)
    outcomes = []
    for _ in range(400):
        out = transform(image)
        assert torch.equal(out, plain) or torch.equal(out, flipped)
        outcomes.append(torch.equal(out, flipped))
    assert 0.42 < np.mean(outcomes) < 0.58
    never = build_train_transform(small, flip_p=0.0, padding=0, erasing_p=0.0)
    assert all(torch.equal(never(image), plain) for _ in range(20))


def test_test_transform_exact_values_on_constant_image():
    colour = (51, 102, 204)
    image = Image.new("RGB", (64, 128), colour)
    out = build_test_transform(SIZE)(image)
    assert out.shape == (3, *SIZE) and out.dtype == torch.float32
    for channel, value in enumerate(colour):
        assert torch.allclose(out[channel], torch.full(SIZE, (value / 255 - 0.5) / 0.5), atol=1e-6)
    imagenet = build_test_transform(SIZE, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))(image)
    assert imagenet[0, 0, 0].item() == pytest.approx((51 / 255 - 0.485) / 0.229, abs=1e-6)


def test_test_transform_is_bilinear():
    image = _random_image()
    expected = _normalised(image.resize((SIZE[1], SIZE[0]), Image.Resampling.BILINEAR))
    assert torch.allclose(build_test_transform(SIZE)(image), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------- erasing


def test_erasing_box_area_and_aspect_bounds():
    erasing = RandomErasing(probability=1.0)
    height, width = SIZE
    torch.manual_seed(0)
    areas, aspects = [], []
    for _ in range(2000):
        box = erasing.sample_box(height, width)
        if box is None:       # all 10 attempts too wide; rare
            continue
        top, left, h, w = box
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # h and w are rounded: allow half a pixel on each side.
        assert 0.02 * height * width - 0.5 * (h + w) - 0.25 <= h * w <= height * width / 3 + 0.5 * (h + w) + 0.25
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3
        areas.append(h * w / (height * width))
        aspects.append(math.log(h / w))
    assert len(areas) > 1900
    assert min(areas) < 0.03 and max(areas) > 0.3                      # the whole range is used
    assert min(aspects) < math.log(0.4) and max(aspects) > math.log(2.5)
    # The area is uniform in [0.02, 1/3] before the fit test: its mean sits near the middle.
    assert 0.14 < np.mean(areas) < 0.2


def test_erasing_fill_statistics_and_probability():
    erasing = RandomErasing(probability=0.5)
    small = (64, 32)
    source = torch.full((3, *small), 7.0)
    torch.manual_seed(0)
    fills, erased = [], 0
    for _ in range(400):
        out = erasing(source)
        changed = (out != 7.0).any(0)
        if not changed.any():
            continue
        erased += 1
        rows, cols = torch.nonzero(changed, as_tuple=True)
        box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        assert changed[box].all(), "the erased region must be one filled rectangle"
        fills.append(out[:, box[0], box[1]].flatten())
    assert torch.equal(source, torch.full((3, *small), 7.0)), "the input must not be modified"
    assert 0.44 < erased / 400 < 0.56
    values = torch.cat(fills)
    assert abs(values.mean().item()) < 0.01 and abs(values.std().item() - 1.0) < 0.01
    # Per pixel and channel, not one value per box or per pixel.
    first = fills[0].view(3, -1)
    assert not torch.equal(first[0], first[1]) and first[0].unique().numel() > 10


def test_erasing_probability_extremes_and_errors():
    never, always = RandomErasing(probability=0.0), RandomErasing(probability=1.0)
    source = torch.zeros(3, 64, 32)
    assert all(never(source) is source for _ in range(50))
    assert sum(not torch.equal(always(source), source) for _ in range(50)) >= 48
    with pytest.raises(ValueError, match="probability"):
        RandomErasing(probability=1.5)
    with pytest.raises(ValueError, match="min_area"):
        RandomErasing(min_area=0.5, max_area=0.2)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        always(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="size"):
        build_train_transform((256,))
