"""TransReID-family train transform, test transform, the pixel-mode RandomErasing and Cluster-Contrast's."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from passreid.data.transforms import (CLUSTER_CONTRAST_FILL, RandomErasing, build_random_erasing, build_test_transform,
                                      build_train_transform)

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


def test_test_transform_bicubic_is_torchvision_bicubic():
    image = _random_image()
    expected = _normalised(F.resize(image, list(SIZE), interpolation=InterpolationMode.BICUBIC))
    bicubic = build_test_transform(SIZE, interpolation="bicubic")(image)
    # Both go through the same PIL resize and float ops: 1e-6 is float32 rounding of the normalisation.
    assert torch.allclose(bicubic, expected, atol=1e-6)
    bilinear = build_test_transform(SIZE, interpolation="bilinear")(image)
    assert (bicubic - bilinear).abs().max() > 0.05  # the two filters differ visibly on a noise image
    with pytest.raises(ValueError, match="interpolation"):
        build_test_transform(SIZE, interpolation="nearest")


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


def _published_cluster_contrast_erasing(img: torch.Tensor, probability=0.5, sl=0.02, sh=0.4, r1=0.3,
                                        mean=(0.485, 0.456, 0.406)) -> torch.Tensor:
    """Cluster-Contrast's RandomErasing.__call__ written out from its published rule (PASS-reID,
    PASS_cluster_contrast_reid/clustercontrast/utils/data/transforms.py), with Python's ``random.uniform(a, b)``
    = ``a + (b - a) * u`` and ``random.randint(a, b)`` (both ends included) drawing from torch's generator."""
    def uniform(a, b):
        return a + (b - a) * torch.rand(()).item()

    def randint(a, b):
        return int(torch.randint(a, b + 1, ()).item())

    img = img.clone()
    if uniform(0, 1) >= probability:
        return img
    for _ in range(100):
        area = img.size()[1] * img.size()[2]
        target_area = uniform(sl, sh) * area
        aspect_ratio = uniform(r1, 1 / r1)
        h = int(round(math.sqrt(target_area * aspect_ratio)))
        w = int(round(math.sqrt(target_area / aspect_ratio)))
        if w < img.size()[2] and h < img.size()[1]:
            x1 = randint(0, img.size()[1] - h)
            y1 = randint(0, img.size()[2] - w)
            for channel in range(3):
                img[channel, x1:x1 + h, y1:y1 + w] = mean[channel]
            return img
    return img


@pytest.mark.parametrize("size", [SIZE, (64, 32), (9, 6)])  # (9, 6): most of the 100 attempts do not fit
def test_cluster_contrast_erasing_matches_the_published_rule(size):
    erasing = build_random_erasing("cluster_contrast", 0.5)
    source = torch.randn(3, *size)
    erased = 0
    for seed in range(300):
        torch.manual_seed(seed)
        got = erasing(source)
        torch.manual_seed(seed)
        expected = _published_cluster_contrast_erasing(source)
        assert torch.equal(got, expected), f"seed {seed}"  # same draws -> same box, same constant fill
        changed = (got != source).any(0)
        if changed.any():
            erased += 1
            fill = got[:, changed]
            assert torch.equal(fill, torch.tensor(CLUSTER_CONTRAST_FILL).view(3, 1).expand_as(fill))
    assert erased > 60  # p = 0.5, and the draws reach the erasing branch
    before = source.clone()
    erasing(source)
    assert torch.equal(source, before)


def test_train_transform_uses_the_selected_erasing():
    for mode, fill in (("cluster_contrast", CLUSTER_CONTRAST_FILL), ("pixel", None)):
        transform = build_train_transform(SIZE, flip_p=0.0, padding=0, erasing_p=1.0, erasing=mode)
        step = transform.transforms[-1]
        assert isinstance(step, RandomErasing)
        assert (step.fill == "pixel") == (fill is None)
        if fill is not None:
            assert (step.max_area, step.max_attempts, step.aspect_sampling) == (0.4, 100, "uniform")
            assert step.fill == fill
    with pytest.raises(ValueError, match="random erasing mode"):
        build_train_transform(SIZE, erasing="cutout")
