"""Occluder paste augmentation (passreid.data.occluders) and its wiring into the fine-tuning train transform."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from passreid.config import ConfigError, load_config
from passreid.data.occluders import OccluderPaste, load_occluders
from passreid.finetune import FinetuneConfig
from passreid.finetune.data import build_train_set

REPO = Path(__file__).resolve().parents[1]


def _rgba(width: int, height: int, alpha: np.ndarray | None = None, colour=(200, 30, 60)) -> Image.Image:
    array = np.zeros((height, width, 4), dtype=np.uint8)
    array[..., :3] = colour
    array[..., 3] = 255 if alpha is None else alpha
    return Image.fromarray(array, "RGBA")


def _person(width: int = 64, height: int = 128) -> Image.Image:
    generator = np.random.default_rng(0)
    return Image.fromarray(generator.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def _blend_reference(image: np.ndarray, occluder: np.ndarray, left: int, top: int) -> np.ndarray:
    """Slow, obvious alpha blend of an RGBA uint8 occluder into an RGB uint8 image at (left, top)."""
    out = image.astype(np.float64)
    height, width = occluder.shape[:2]
    for y in range(height):
        for x in range(width):
            a = occluder[y, x, 3] / 255.0
            out[top + y, left + x] = a * occluder[y, x, :3] + (1 - a) * out[top + y, left + x]
    return out


def test_missing_or_unusable_occluder_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_occluders(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.png"):
        load_occluders(tmp_path / "empty")
    folder = tmp_path / "bad"
    folder.mkdir()
    _rgba(8, 8).save(folder / "good.png")
    Image.new("RGB", (8, 8)).save(folder / "opaque.png")
    _rgba(8, 8, alpha=np.zeros((8, 8), np.uint8)).save(folder / "invisible.png")
    with pytest.raises(ValueError, match="2 unusable") as error:
        load_occluders(folder)
    assert "opaque.png (mode RGB, no alpha channel)" in str(error.value)
    assert "invisible.png (fully transparent)" in str(error.value)


def test_paste_blends_with_the_occluder_alpha_and_leaves_the_rest_alone():
    alpha = np.zeros((40, 30), np.uint8)
    alpha[:, 10:20] = 128
    alpha[:, 20:] = 255
    paste = OccluderPaste([_rgba(30, 40, alpha)], p=1.0, area=(0.2, 0.3))
    image = _person()
    torch.manual_seed(5)
    plan = paste.plan(*image.size)
    out = np.asarray(paste.apply(image, plan)).astype(np.float64)
    occluder = np.asarray(paste.occluder_for(plan))
    expected = _blend_reference(np.asarray(image), occluder, plan.left, plan.top)
    assert np.abs(out - expected).max() <= 1.0  # PIL's integer blend rounds
    inside = np.zeros(out.shape[:2], bool)
    inside[plan.top:plan.top + plan.height, plan.left:plan.left + plan.width] = True
    transparent = inside.copy()
    transparent[inside] = occluder[..., 3].reshape(-1) == 0
    untouched = ~inside | transparent
    assert np.array_equal(out[untouched], np.asarray(image)[untouched])  # alpha 0 and outside: unchanged
    assert transparent.any() and (inside & ~transparent).any()
    opaque = occluder[..., 3] == 255
    assert np.abs(out[inside][opaque.reshape(-1)] - occluder[..., :3][opaque]).max() == 0


def test_the_box_covers_the_configured_area_fraction_and_stays_inside():
    occluders = [_rgba(30, 40), _rgba(200, 10), _rgba(5, 300)]  # regular, very wide, very tall
    paste = OccluderPaste(occluders, p=1.0, area=(0.1, 0.4))
    torch.manual_seed(0)
    seen = set()
    for _ in range(300):
        plan = paste.plan(64, 128)
        seen.add(plan.index)
        fraction = plan.width * plan.height / (64 * 128)
        # rounding each side to whole pixels moves the area by at most (w + h + 1) pixels
        slack = (plan.width + plan.height + 1) / (64 * 128)
        assert 0.1 - slack <= fraction <= 0.4 + slack, plan
        assert 0 <= plan.left and plan.left + plan.width <= 64 and 0 <= plan.top and plan.top + plan.height <= 128
    assert seen == {0, 1, 2}


def test_probability_and_seed_make_it_reproducible():
    paste = OccluderPaste([_rgba(30, 40)], p=0.5)
    image = _person()
    torch.manual_seed(11)
    first = [np.asarray(paste(image)) for _ in range(20)]
    torch.manual_seed(11)
    second = [np.asarray(paste(image)) for _ in range(20)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    changed = sum(not np.array_equal(a, np.asarray(image)) for a in first)
    assert 3 <= changed <= 17  # p = 0.5 over 20 draws
    never = OccluderPaste([_rgba(30, 40)], p=0.0)
    assert all(never.plan(64, 128) is None for _ in range(50))
    with pytest.raises(ValueError, match="area range"):
        OccluderPaste([_rgba(30, 40)], area=(0.5, 0.2))


def test_generated_occluders_feed_the_finetune_train_transform(tmp_path, synthetic_world):
    occluders = load_occluders(synthetic_world / "occluders")
    assert len(occluders) >= 5 and all(o.mode == "RGBA" for o in occluders)
    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo_occluded.yaml",
                      [f"train.output_dir={tmp_path / 'run'}", f"data.root={synthetic_world}/market_occluded",
                       f"data.occluder_dir={synthetic_world / 'occluders'}", "data.occluder_p=1.0", "data.color_jitter=[0.3,0.3,0.2,0.2]"])
    steps = build_train_set([], cfg).transform.transforms
    assert isinstance(steps[0], OccluderPaste) and len(steps[0].occluders) == len(occluders)
    assert isinstance(steps[1], T.Resize) and isinstance(steps[2], T.ColorJitter)
    torch.manual_seed(0)
    assert steps[0](_person()).size == (64, 128)
    plain = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo_occluded.yaml", [])
    assert not any(isinstance(s, (OccluderPaste, T.ColorJitter)) for s in build_train_set([], plain).transform.transforms)
    missing = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo.yaml",
                          [f"data.occluder_dir={tmp_path / 'none'}"])
    with pytest.raises(FileNotFoundError, match="data.occluder_dir"):
        build_train_set([], missing)


def test_config_rejects_bad_occluder_settings():
    from passreid.finetune import validate_config

    for override in ("data.occluder_area=[0.0,0.3]", "data.occluder_p=1.5", "data.color_jitter=[0.3]"):
        cfg = load_config(FinetuneConfig, None, [override])
        with pytest.raises(ConfigError):
            validate_config(cfg)
