"""Parsing masks: BPBReID file format, part grouping, background channel, errors, mask-aware augmentation,
and the masks the generated world writes (its images stay those of generator version 1)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from passreid.demo import world as synthetic
from passreid.data.mask_transforms import MaskedTrainTransform
from passreid.data.masks import (PART_GROUPINGS, PIFPAF_FIELDS, MaskedImageDataset, MaskFileError, add_background,
                                 check_masks_exist, group_fields, mask_path, num_parts, part_masks_from_fields,
                                 read_pifpaf_fields, write_pifpaf_fields)
from passreid.demo.world import SyntheticWorldSpec, render_image, render_occluder, sample_camera, sample_identity

# SHA-256 over (relative path, bytes) of every .jpg of market/, market_occluded/ and pool/ of the default world,
# computed with generator version 1 (before masks existed): adding masks must not change a single image.
DEFAULT_WORLD_IMAGES_V1 = "eb06270548728a11d6cc40a022fbcae7b09fe5cc120ef9384540c33bb964baca"


def _random_fields(seed: int, h: int = 8, w: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).random((36, h, w)).astype(np.float32)


# ------------------------------------------------------------------------------------------- format


def test_round_trip_and_published_paths(tmp_path):
    image = tmp_path / "Market-1501-v15.09.15" / "bounding_box_train" / "0002_c1s1_000451_03.jpg"
    path = mask_path(image, "pifpaf_maskrcnn_filtering", ".npy")
    assert path == (tmp_path / "Market-1501-v15.09.15" / "masks" / "pifpaf_maskrcnn_filtering" /
                    "bounding_box_train" / "0002_c1s1_000451_03.npy")
    duke = mask_path(tmp_path / "Occluded_Duke" / "query" / "0001_c2_f0046182.jpg", "pifpaf_maskrcnn_filtering",
                     ".jpg.confidence_fields.npy")
    assert duke.name == "0001_c2_f0046182.jpg.confidence_fields.npy" and duke.parent.name == "query"
    # Occluded-REID: the per-identity folder is skipped (split folder = first folder below the dataset).
    root = tmp_path / "Occluded_REID"
    occ = mask_path(root / "occluded_body_images" / "001" / "001_01.tif", "pifpaf_maskrcnn_filtering", ".npy", root)
    assert occ == root / "masks" / "pifpaf_maskrcnn_filtering" / "occluded_body_images" / "001_01.npy"

    fields = _random_fields(0)
    write_pifpaf_fields(path, fields)
    raw = np.load(path)  # the published reader: plain np.load, (36, h, w) float32
    assert raw.dtype == np.float32 and raw.shape == (36, 8, 4)
    np.testing.assert_array_equal(read_pifpaf_fields(path), fields)


def test_missing_and_misshaped_masks_are_clear_errors(tmp_path):
    folder = tmp_path / "ds" / "bounding_box_train"
    images = [folder / f"000{i}_c1s1_000001_01.jpg" for i in range(3)]
    write_pifpaf_fields(mask_path(images[0], "m", ".npy"), _random_fields(1))
    with pytest.raises(MaskFileError, match=r"(?s)2 of 3 images have no parsing mask.*0001_c1s1_000001_01\.jpg"):
        check_masks_exist(images, "m", ".npy")
    with pytest.raises(MaskFileError, match="parsing mask not found"):
        read_pifpaf_fields(mask_path(images[1], "m", ".npy"), images[1])
    bad = {"wrong_channels": np.zeros((17, 8, 4), np.float32), "two_d": np.zeros((8, 4), np.float32),
           "out_of_range": np.full((36, 8, 4), 2.0, np.float32), "nan": np.full((36, 8, 4), np.nan, np.float32),
           "integer": np.zeros((36, 8, 4), np.int64)}
    patterns = {"wrong_channels": r"\(36, h, w\).*\(17, 8, 4\)", "two_d": r"\(36, h, w\).*\(8, 4\)",
                "out_of_range": r"\[0, 1\]", "nan": "NaN", "integer": "floating"}
    for name, array in bad.items():
        path = tmp_path / f"{name}.npy"
        np.save(path, array)
        with pytest.raises(MaskFileError, match=patterns[name]):
            read_pifpaf_fields(path)
    with pytest.raises(MaskFileError):
        write_pifpaf_fields(tmp_path / "x.npy", np.zeros((35, 4, 4), np.float32))
    with pytest.raises(MaskFileError, match="no parsing mask"):
        MaskedImageDataset([(str(p), 0, 0) for p in images], transform=lambda image, fields: (image, fields),
                           masks_dir="m", suffix=".npy")


# ----------------------------------------------------------------------------------------- grouping


def test_grouping_is_the_channel_max_of_the_published_members():
    fields = torch.from_numpy(_random_fields(2))
    assert num_parts("five_v") == 5 and num_parts("eight") == 8
    assert set(PART_GROUPINGS["eight"]["left_foot"]) == {"left_ankle"}
    for grouping, parts in PART_GROUPINGS.items():
        grouped = group_fields(fields, grouping)
        assert grouped.shape == (len(parts), 8, 4)
        for k, members in enumerate(parts.values()):
            for y in range(8):
                for x in range(4):
                    expected = max(float(fields[PIFPAF_FIELDS.index(m), y, x]) for m in members)
                    assert float(grouped[k, y, x]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="unknown mask grouping"):
        group_fields(fields, "seven")


def test_background_channel_threshold_and_softmax():
    parts = torch.tensor([[[0.9, 0.2], [0.4, 0.0]], [[0.1, 0.3], [0.45, 0.0]]])  # K=2, 2x2
    masks = add_background(parts, "threshold", threshold=0.5, softmax_weight=15.0)
    assert masks.shape == (3, 2, 2)
    for y in range(2):
        for x in range(2):
            bg = 1.0 if max(parts[:, y, x]) < 0.5 else 0.0
            logits = 15.0 * torch.tensor([bg, *parts[:, y, x].tolist()])
            torch.testing.assert_close(masks[:, y, x], torch.softmax(logits, 0))
    assert int(masks[:, 0, 0].argmax()) == 1 and int(masks[:, 1, 1].argmax()) == 0   # part 1; background
    plain = add_background(parts, "sum", softmax_weight=0)
    torch.testing.assert_close(plain.sum(0), torch.ones(2, 2))
    target = part_masks_from_fields(torch.from_numpy(_random_fields(3)), "five_v", size=(16, 8))
    assert target.shape == (6, 16, 8)
    torch.testing.assert_close(target.sum(0), torch.ones(16, 8))


# ------------------------------------------------------------------------------------ augmentation


@pytest.mark.parametrize("erasing", ["coarse_dropout", "pixel"])
def test_mask_aware_transform_keeps_image_and_masks_aligned(erasing):
    height, width = 64, 32
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[8:24, 4:20] = 255                                   # a white block, off-centre
    fields = np.zeros((36, height, width), np.float32)
    fields[PIFPAF_FIELDS.index("nose"), 8:24, 4:20] = 1.0     # the head part covers exactly the block
    transform = MaskedTrainTransform((height, width), "five_v", flip_p=0.5, padding=6, erasing_p=1.0,
                                     erasing=erasing, mask_scale=1)
    flipped = erased = 0
    for seed in range(12):
        torch.manual_seed(seed)
        img, masks = transform(Image.fromarray(pixels), fields)
        assert img.shape == (3, height, width) and masks.shape == (6, height, width)
        white = img[0] == 1.0                                  # (1 - 0.5) / 0.5 after normalisation
        head = masks.argmax(0) == 1
        assert torch.equal(white, head), f"seed {seed}: image and mask disagree"
        flipped += int(white[:, width - 10:].any())
        erased += int(white.sum() < 16 * 16)
    assert flipped and erased  # the draws did flip, shift and erase


def test_constant_masks_show_padding_and_erasing():
    transform = MaskedTrainTransform((64, 32), flip_p=0.0, padding=0, erasing_p=1.0, erasing="pixel", mask_scale=1)
    torch.manual_seed(0)
    img, masks = transform(Image.new("RGB", (32, 64), (255, 255, 255)), None)
    assert masks.shape == (2, 64, 32)
    kept = img[0] == 1.0                                       # not erased
    assert torch.equal(masks[1].bool(), kept) and not bool(kept.all())


# ------------------------------------------------------------------------------- generated world


def _world_images_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for sub in ("market", "market_occluded", "pool"):
        for path in sorted((root / sub).rglob("*.jpg")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_world_images_unchanged_and_every_image_has_a_mask(synthetic_world):
    assert _world_images_digest(synthetic_world) == DEFAULT_WORLD_IMAGES_V1
    for subset in ("market", "market_occluded"):
        images = sorted((synthetic_world / subset).glob("bounding_box_*/*.jpg")) + \
            sorted((synthetic_world / subset / "query").glob("*.jpg"))
        paths = check_masks_exist(images, synthetic.WORLD_MASKS_DIR, ".npy")
        assert len(paths) == len(images) > 300
        assert read_pifpaf_fields(paths[0]).shape == (36, 32, 16)


def test_world_mask_files_are_the_rendered_fields(synthetic_world):
    spec = SyntheticWorldSpec()
    items, num_ids = synthetic._plan_items(spec)
    world = synthetic._World(spec, num_ids)
    plan = synthetic._occlusion_plan(spec, items)
    occluded = [i for i, flag in enumerate(plan) if flag][:3]
    for index in [0, 5] + occluded:
        item = items[index]
        name = synthetic._market_name(item.pid, item.camera, item.frame, item.bbox)
        folder = synthetic.SPLIT_FOLDERS[item.split]
        stored = read_pifpaf_fields(synthetic.world_mask_path(synthetic_world / "market_occluded", folder, name))
        expected = synthetic.image_fields(world.render(item, occlude=plan[index]))
        np.testing.assert_array_equal(stored, expected)


def _inside(box, y: float, x: float, margin: float) -> bool:
    x0, y0, x1, y1 = box
    return x0 - margin <= x <= x1 + margin and y0 - margin <= y <= y1 + margin


def test_world_masks_match_the_part_boxes_and_hide_the_occluded_body():
    spec = SyntheticWorldSpec()
    stride = synthetic.MASK_STRIDE
    expected_box = {"head": ("head", "torso"), "upper_arms_torso": ("torso",), "lower_arms_torso": ("torso", "legs"),
                    "legs": ("legs",), "feet": ("legs",)}
    for index in range(12):
        camera = sample_camera(np.random.default_rng(index), "ab"[index % 2], index)
        identity = sample_identity(np.random.default_rng(50 + index))
        image = render_image(identity, camera, np.random.default_rng(index), spec.height, spec.width)
        boxes = image.parts._asdict()
        grouped = group_fields(torch.from_numpy(synthetic.image_fields(image)), "five_v")
        for k, part in enumerate(PART_GROUPINGS["five_v"]):
            cells = (grouped[k] > 0.5).nonzero().tolist()
            assert cells, f"image {index}: part {part} has no confident cell"
            # Fields spill a little past the painted pieces (a flat top plus a Gaussian edge): 1.5 cells of slack.
            inside = [any(_inside(boxes[b], (y + 0.5) * stride, (x + 0.5) * stride, 1.5 * stride)
                          for b in expected_box[part]) for y, x in cells]
            assert sum(inside) >= 0.85 * len(inside), f"image {index}: {part} outside its box"
        # The same person behind an occluder: fully covered cells carry no confidence at all.
        hidden = render_image(identity, camera, np.random.default_rng(index), spec.height, spec.width,
                              occluder=render_occluder("box", np.random.default_rng(index)),
                              occlusion_rng=np.random.default_rng(100 + index))
        np.testing.assert_array_equal(hidden.pixels, render_image(
            identity, camera, np.random.default_rng(index), spec.height, spec.width,
            occluder=render_occluder("box", np.random.default_rng(index)),
            occlusion_rng=np.random.default_rng(100 + index)).pixels)
        fields = synthetic.image_fields(hidden)
        cover = hidden.occluder_cover.reshape(spec.height // stride, stride, spec.width // stride, stride)
        covered = cover.all(axis=(1, 3))
        assert covered.any() and not fields[:, covered].any()
        assert fields.sum() < synthetic.image_fields(image).sum()


def test_masked_dataset_on_the_world(synthetic_world):
    from passreid.data import build_dataset

    dataset = build_dataset("market1501", synthetic_world / "market_occluded")
    transform = MaskedTrainTransform((128, 64), "eight", padding=5)
    masked = MaskedImageDataset(dataset.train[:4], transform, masks_dir=synthetic.WORLD_MASKS_DIR, suffix=".npy")
    sample = masked[0]
    assert sample["img"].shape == (3, 128, 64) and sample["masks"].shape == (9, 32, 16)
    assert sample["pid"] == dataset.train[0].pid and sample["index"] == 0
    torch.testing.assert_close(sample["masks"].sum(0), torch.ones(32, 16))
