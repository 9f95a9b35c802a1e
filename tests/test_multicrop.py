"""MultiCropAugmentation: view shapes and order, band geometry, DINO mode, determinism, composition."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from passreid.data.multicrop import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugmentation,
    RandomGaussianBlur,
    RandomSolarize,
    band_rows,
    crop_bands,
)


def row_index_image(height: int = 256, width: int = 100) -> Image.Image:
    """RGB image whose every pixel holds its row index (so a crop reveals its source rows)."""
    rows = np.repeat(np.arange(height, dtype=np.uint8)[:, None], width, axis=1)
    return Image.fromarray(np.stack([rows] * 3, axis=-1), mode="RGB")


def random_image(height: int = 200, width: int = 90, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def test_eleven_views_in_published_shapes_and_order():
    views = MultiCropAugmentation()(random_image())
    assert len(views) == 11
    assert [tuple(v.shape) for v in views] == [(3, 256, 128)] * 2 + [(3, 128, 64)] * 9
    assert all(v.dtype == torch.float32 for v in views)


def test_band_rows_are_the_published_bands():
    assert band_rows(256) == [(0, 128), (64, 128), (128, 128)]  # [0,.5H) [.25H,.75H) [.5H,H)
    assert band_rows(201) == [(0, 100), (50, 100), (100, 100)]  # int() truncation as published
    image = row_index_image(256)
    for band, (low, high) in zip(crop_bands(image), [(0, 128), (64, 192), (128, 256)]):
        rows = np.asarray(band)[:, 0, 0]
        assert band.size == (100, 128)
        np.testing.assert_array_equal(rows, np.arange(low, high))


def test_each_local_view_comes_from_its_band():
    """With the crop resampled by nearest neighbour and no colour change, the pixel values of a
    local view are its source rows: they must lie in the band of its slot in the output order."""
    aug = MultiCropAugmentation()
    aug.local_transform = T.Compose([
        T.RandomResizedCrop(aug.local_size, scale=aug.local_scale, interpolation=InterpolationMode.NEAREST),
        T.PILToTensor(),
    ])
    expected = [(0, 128)] * 3 + [(64, 192)] * 3 + [(128, 256)] * 3
    torch.manual_seed(0)
    for _ in range(10):
        views = aug(row_index_image(256))
        for view, (low, high) in zip(views[2:], expected):
            rows = view[0].long()
            assert low <= rows.min().item() and rows.max().item() < high


def test_dino_mode_cuts_locals_from_the_whole_image():
    aug = MultiCropAugmentation(mode="dino", local_crops_number=8)
    assert aug.local_scale == (0.05, 0.4)
    assert aug.crops_per_band == 0
    image = random_image()
    assert all(source is image for source in aug.local_sources(image))
    views = aug(image)
    assert [tuple(v.shape) for v in views] == [(3, 256, 128)] * 2 + [(3, 128, 64)] * 8
    # Whole-image locals reach every row of the image (the bands of PASS mode would not: the
    # upper band never reaches the bottom quarter, the lower band never the top half).
    aug.local_transform = T.Compose([
        T.RandomResizedCrop(aug.local_size, scale=(0.9, 1.0), ratio=(0.3, 0.4), interpolation=InterpolationMode.NEAREST),
        T.PILToTensor(),
    ])
    torch.manual_seed(0)
    views = aug(row_index_image(256))
    for view in views[2:]:
        assert view[0].min().item() < 20 and view[0].max().item() > 235


def test_pass_mode_sources_are_bands_repeated_per_crop():
    aug = MultiCropAugmentation(local_crops_number=6)
    sources = aug.local_sources(row_index_image(256))
    firsts = [int(np.asarray(s)[0, 0, 0]) for s in sources]
    assert firsts == [0, 0, 64, 64, 128, 128]


def test_deterministic_under_torch_seed():
    image = random_image(seed=5)
    aug = MultiCropAugmentation()
    torch.manual_seed(123)
    random.seed(999)
    first = aug(image)
    torch.manual_seed(123)
    random.seed(0)  # python's RNG is not used
    second = aug(image)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    torch.manual_seed(124)
    third = aug(image)
    assert not all(torch.equal(a, b) for a, b in zip(first, third))


def _unpack(compose: T.Compose) -> list:
    return list(compose.transforms)


def test_transform_composition_is_the_published_one():
    aug = MultiCropAugmentation()
    for transform, blur_p, solarize_p in (
        (aug.global_transform1, 1.0, None),
        (aug.global_transform2, 0.1, 0.2),
        (aug.local_transform, 0.5, None),
    ):
        steps = _unpack(transform)
        crop = steps[0]
        assert isinstance(crop, T.RandomResizedCrop)
        assert crop.interpolation == InterpolationMode.BICUBIC
        assert crop.ratio == pytest.approx((3 / 4, 4 / 3))  # torchvision default, kept on purpose
        flip, jitter, gray = _unpack(steps[1])
        assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
        assert isinstance(jitter, T.RandomApply) and jitter.p == 0.8
        color = jitter.transforms[0]
        assert isinstance(color, T.ColorJitter)
        assert color.brightness == (0.6, 1.4) and color.contrast == (0.6, 1.4)
        assert color.saturation == (0.8, 1.2) and color.hue == (-0.1, 0.1)
        assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.2
        blur = steps[2]
        assert isinstance(blur, RandomGaussianBlur) and blur.p == blur_p
        assert (blur.radius_min, blur.radius_max) == (0.1, 2.0)
        if solarize_p is None:
            assert not any(isinstance(s, RandomSolarize) for s in steps)
        else:
            assert isinstance(steps[3], RandomSolarize) and steps[3].p == solarize_p
            assert steps[3].threshold == 128
        to_tensor, normalize = _unpack(steps[-1])
        assert isinstance(to_tensor, T.ToTensor)
        assert tuple(normalize.mean) == IMAGENET_MEAN and tuple(normalize.std) == IMAGENET_STD
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    assert _unpack(aug.global_transform1)[0].size == (256, 128)
    assert _unpack(aug.global_transform1)[0].scale == (0.4, 1.0)
    assert _unpack(aug.local_transform)[0].size == (128, 64)
    assert _unpack(aug.local_transform)[0].scale == (0.1, 0.8)


def test_normalisation_uses_imagenet_statistics():
    aug = MultiCropAugmentation()
    image = Image.new("RGB", (128, 256), (124, 116, 104))
    tensor = _unpack(aug.global_transform1)[-1](image)
    expected = (torch.tensor([124, 116, 104]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(tensor[:, 0, 0], expected.float())


def test_blur_and_solarize_probabilities():
    image = random_image(seed=2)
    assert RandomGaussianBlur(p=0.0)(image) is image
    assert RandomSolarize(p=0.0)(image) is image
    assert np.array_equal(np.asarray(RandomSolarize(p=1.0)(image)), np.asarray(ImageOps.solarize(image, 128)))
    assert not np.array_equal(np.asarray(RandomGaussianBlur(p=1.0)(image)), np.asarray(image))
    torch.manual_seed(0)
    hits = sum(RandomSolarize(p=0.2)(image) is not image for _ in range(2000))
    assert 300 < hits < 500  # Binomial(2000, 0.2): mean 400, sd 18


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 3"):
        MultiCropAugmentation(local_crops_number=8)
    with pytest.raises(ValueError, match="mode must be one of"):
        MultiCropAugmentation(mode="ibot")
    with pytest.raises(TypeError, match="expects a PIL image"):
        MultiCropAugmentation()(torch.zeros(3, 256, 128))
