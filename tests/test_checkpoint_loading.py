"""Checkpoint conversion/loading, and the ViT forward pinned against a slow manual re-computation.

A checkpoint is written in the published PASS pre-training key layout (PASS-reID: PASS/main_pass.py,
``save_dict``) from random tensors whose shapes are written out from the published code, not taken from our model; after loading, the
model's outputs must equal a plain-torch forward computed directly from those tensors.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _released_checkpoints import torchreid_config, yacs_config
from passreid.models import (
    CheckpointFormatError,
    CheckpointMismatchError,
    LoadReport,
    build_vit,
    export_backbone,
    extract_backbone_state_dict,
    infer_pretrain_grid,
    load_pretrained,
    read_checkpoint,
)

# vit_tiny: D=192, depth 4, 3 heads, mlp ratio 4.
DIM, DEPTH, HEADS, HIDDEN = 192, 4, 3, 768
PATCH = 16
LN_EPS = 1e-6
BLOCK_LAYERS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


# --------------------------------------------------------------------- fixtures
def pass_backbone_shapes(num_patches: int = 128) -> dict[str, tuple[int, ...]]:
    """Backbone tensor shapes of a PASS ViT (PASS-reID: PASS/vision_transformer.py), written out independently."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, DIM), "cls_pos": (1, 1, DIM), "pos_embed": (1, num_patches, DIM),
        "patch_embed.proj.weight": (DIM, 3, PATCH, PATCH), "patch_embed.proj.bias": (DIM,),
        "norm.weight": (DIM,), "norm.bias": (DIM,),
    }
    for i in (1, 2, 3):
        shapes[f"part_token{i}"] = (1, 1, DIM)
        shapes[f"part{i}_pos"] = (1, 1, DIM)
    for b in range(DEPTH):
        p = f"blocks.{b}."
        shapes.update({
            p + "norm1.weight": (DIM,), p + "norm1.bias": (DIM,),
            p + "attn.qkv.weight": (3 * DIM, DIM), p + "attn.qkv.bias": (3 * DIM,),
            p + "attn.proj.weight": (DIM, DIM), p + "attn.proj.bias": (DIM,),
            p + "norm2.weight": (DIM,), p + "norm2.bias": (DIM,),
            p + "mlp.fc1.weight": (HIDDEN, DIM), p + "mlp.fc1.bias": (HIDDEN,),
            p + "mlp.fc2.weight": (DIM, HIDDEN), p + "mlp.fc2.bias": (DIM,),
        })
    return shapes


def random_backbone(seed: int, num_patches: int = 128) -> dict[str, torch.Tensor]:
    """Random float64 weights with scales that keep activations in a sensible range."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in pass_backbone_shapes(num_patches).items():
        noise = torch.randn(shape, generator=generator, dtype=torch.float64)
        if key.endswith(("norm1.weight", "norm2.weight")) or key == "norm.weight":
            tensors[key] = 1.0 + 0.1 * noise
        elif key.endswith("bias"):
            tensors[key] = 0.05 * noise
        elif key == "patch_embed.proj.weight":
            tensors[key] = noise / math.sqrt(3 * PATCH * PATCH)
        elif key.endswith("weight"):
            tensors[key] = noise / math.sqrt(shape[1])
        else:  # tokens and positions
            tensors[key] = 0.5 * noise
    return tensors


def pass_head_state(prefix: str) -> dict[str, torch.Tensor]:
    """A (shrunken) PASS DINOHead state dict: 4 MLPs (indices 0,2,4) and 4 weight-normed last layers."""
    head = {}
    for name in ("cls", "pt1", "pt2", "pt3"):
        for index, shape in ((0, (8, DIM)), (2, (8, 8)), (4, (4, 8))):
            head[f"{prefix}head.mlp_{name}.{index}.weight"] = torch.randn(shape)
            head[f"{prefix}head.mlp_{name}.{index}.bias"] = torch.randn(shape[0])
        head[f"{prefix}head.last_layer_{name}.weight_g"] = torch.ones(16, 1)
        head[f"{prefix}head.last_layer_{name}.weight_v"] = torch.randn(16, 4)
    return head


@pytest.fixture(scope="module")
def teacher_weights():
    return random_backbone(seed=1)


@pytest.fixture(scope="module")
def student_weights():
    return random_backbone(seed=2)


@pytest.fixture(scope="module")
def pass_checkpoint(teacher_weights, student_weights):
    """A pre-training checkpoint.pth dict in the published layout (DDP student, plain teacher)."""
    return {
        "student": {**{f"module.backbone.{k}": v for k, v in student_weights.items()},
                    **pass_head_state("module.")},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher_weights.items()}, **pass_head_state("")},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_small", local_crops_number=9),
        "dino_loss": {f"center_{n}": torch.zeros(1, 16) for n in ("cls", "pt1", "pt2", "pt3")},
    }


def tiny(**kwargs):
    torch.manual_seed(0)
    return build_vit("vit_tiny", **kwargs).eval()


# ------------------------------------------------- slow, obviously-correct forward
def bicubic_matrix(in_size: int, out_size: int, scale: float) -> torch.Tensor:
    """(out, in) matrix of PyTorch's bicubic resampling (A=-0.75, align_corners=False, given scale)."""
    a = -0.75

    def kernel(distance: float) -> float:
        t = abs(distance)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        if t < 2:
            return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return 0.0

    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        source = (i + 0.5) / scale - 0.5
        base = math.floor(source)
        for offset in (-1, 0, 1, 2):
            index = min(max(base + offset, 0), in_size - 1)  # border replication
            matrix[i, index] += kernel(source - (base + offset))
    return matrix


def manual_positions(pos_embed, old_grid, new_grid, resample: bool):
    """PASS interp: (1, D, 16, 8) grid scaled by ((h+0.1)/16, (w+0.1)/8), bicubic."""
    if not resample:
        return pos_embed[0]
    (old_h, old_w), (new_h, new_w) = old_grid, new_grid
    grid = pos_embed[0].reshape(old_h, old_w, -1)  # (h, w, D)
    rows = bicubic_matrix(old_h, new_h, (new_h + 0.1) / old_h)
    cols = bicubic_matrix(old_w, new_w, (new_w + 0.1) / old_w)
    resampled = torch.einsum("ih,jw,hwd->ijd", rows, cols, grid)
    return resampled.reshape(new_h * new_w, -1)


def layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS) * weight + bias


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def manual_forward(w, image, part_index=None, stride=PATCH, quirk=False, pos_grid=(16, 8)):
    """All final-LN tokens of one image (C, H, W), from weight dict ``w``, plain loops and matmuls.

    ``pos_grid`` is the grid ``w["pos_embed"]`` is laid out for.
    """
    _, height, width = image.shape
    grid = ((height - PATCH) // stride + 1, (width - PATCH) // stride + 1)
    kernel = w["patch_embed.proj.weight"].reshape(DIM, -1)
    patches = []
    for r in range(grid[0]):
        for c in range(grid[1]):
            pixels = image[:, r * stride:r * stride + PATCH, c * stride:c * stride + PATCH].reshape(-1)
            patches.append(kernel @ pixels + w["patch_embed.proj.bias"])
    patches = torch.stack(patches)
    positions = manual_positions(w["pos_embed"], pos_grid, grid, resample=quirk or grid != pos_grid)
    parts = [1, 2, 3] if part_index is None else [part_index + 1]
    leading = [w["cls_token"][0, 0] + w["cls_pos"][0, 0]]
    leading += [w[f"part_token{p}"][0, 0] + w[f"part{p}_pos"][0, 0] for p in parts]
    x = torch.cat([torch.stack(leading), patches + positions])
    head_dim = DIM // HEADS
    for b in range(DEPTH):
        p = f"blocks.{b}."
        h = layer_norm(x, w[p + "norm1.weight"], w[p + "norm1.bias"])
        qkv = h @ w[p + "attn.qkv.weight"].T + w[p + "attn.qkv.bias"]
        heads = []
        for head in range(HEADS):
            q = qkv[:, head * head_dim:(head + 1) * head_dim]
            k = qkv[:, DIM + head * head_dim:DIM + (head + 1) * head_dim]
            v = qkv[:, 2 * DIM + head * head_dim:2 * DIM + (head + 1) * head_dim]
            heads.append(torch.softmax(q @ k.T / math.sqrt(head_dim), dim=-1) @ v)
        x = x + torch.cat(heads, dim=1) @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        h = layer_norm(x, w[p + "norm2.weight"], w[p + "norm2.bias"])
        h = gelu(h @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"])
        x = x + h @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
    return layer_norm(x, w["norm.weight"], w["norm.bias"])


def test_bicubic_reference_has_the_known_2x_coefficients():
    # Guard for the reference itself: 2x upsampling with A=-0.75 uses the textbook weights
    # (-0.10546875, 0.87890625, 0.26171875, -0.03515625) at fractional offset 0.25.
    matrix = bicubic_matrix(8, 16, 2.0)
    row = matrix[5]  # source (5 + 0.5) / 2 - 0.5 = 2.25
    expected = torch.zeros(8, dtype=torch.float64)
    expected[1:5] = torch.tensor([-0.10546875, 0.87890625, 0.26171875, -0.03515625], dtype=torch.float64)
    torch.testing.assert_close(row, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(matrix.sum(1), torch.ones(16, dtype=torch.float64))


# ------------------------------------------------ PASS checkpoint -> exact forward
@pytest.mark.parametrize("quirk", [False, True], ids=["finetune-positions", "pass-quirk"])
def test_pass_checkpoint_forward_matches_manual_computation(pass_checkpoint, teacher_weights, quirk):
    model = tiny(pass_interp_quirk=quirk).double()
    report = load_pretrained(model, pass_checkpoint)
    assert report.is_exact and len(report.loaded) == report.num_model_tensors == len(teacher_weights)

    torch.manual_seed(5)
    images = torch.randn(2, 3, 256, 128, dtype=torch.float64)
    out = model(images)
    tokens = model.forward_tokens(images)
    assert out.shape == (2, 4, DIM)
    for b in range(2):
        expected = manual_forward(teacher_weights, images[b], quirk=quirk)
        torch.testing.assert_close(tokens[b], expected, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out[b], expected[:4], rtol=1e-9, atol=1e-9)

    crops = torch.randn(1, 3, 128, 64, dtype=torch.float64)
    for k in range(3):
        expected = manual_forward(teacher_weights, crops[0], part_index=k, quirk=quirk)
        torch.testing.assert_close(model.forward_tokens(crops, part_index=k)[0], expected,
                                   rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(model(crops, part_index=k)[0], expected[:2], rtol=1e-9, atol=1e-9)


def test_overlapping_stride_forward_matches_manual_computation(teacher_weights):
    # Stride 12 at 256x128: a 21x10 grid, positions resized from the 16x8 pretrained grid at load time.
    model = tiny(stride_size=12).double()
    report = load_pretrained(model, {"backbone": teacher_weights})
    assert report.resized == [("pos_embed", (16, 8), (21, 10))]
    weights = dict(teacher_weights, pos_embed=model.pos_embed.detach().clone())
    image = torch.randn(1, 3, 256, 128, dtype=torch.float64)
    expected = manual_forward(weights, image[0], stride=12, pos_grid=(21, 10))
    torch.testing.assert_close(model.forward_tokens(image)[0], expected, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------ layouts and sources
def test_teacher_extraction_drops_heads_and_training_state(pass_checkpoint, teacher_weights):
    state, dropped = extract_backbone_state_dict(pass_checkpoint)
    assert set(state) == set(teacher_weights)
    assert all(torch.equal(state[k], v) for k, v in teacher_weights.items())
    assert "teacher.head.mlp_pt2.4.weight" in dropped
    assert "teacher.head.last_layer_cls.weight_g" in dropped
    assert {"student/*", "optimizer/*", "dino_loss/*"} <= set(dropped)
    assert not any(d.startswith("teacher.backbone") for d in dropped)


def test_student_selection_strips_ddp_prefix(pass_checkpoint, student_weights):
    model = tiny().double()
    report = load_pretrained(model, pass_checkpoint, which="student")
    assert report.is_exact
    torch.testing.assert_close(model.part_token2.detach(), student_weights["part_token2"])
    assert "student.head.mlp_cls.0.weight" in report.dropped
    with pytest.raises(ValueError, match="'teacher' or 'student'"):
        extract_backbone_state_dict(pass_checkpoint, which="ema")


def test_checkpoint_file_with_pickled_args_loads_weights_only(tmp_path, pass_checkpoint, teacher_weights):
    path = tmp_path / "checkpoint.pth"
    torch.save(pass_checkpoint, path)
    model = tiny().double()
    report = load_pretrained(model, path)
    assert report.source == str(path) and report.is_exact
    torch.testing.assert_close(model.blocks[3].mlp.fc2.weight.detach(), teacher_weights["blocks.3.mlp.fc2.weight"])


def test_converted_and_wrapped_state_dicts_load(pass_checkpoint, teacher_weights):
    # convert_model_dino.py: teacher, strip module., keep backbone.*, strip backbone.
    converted = {k[len("backbone."):]: v for k, v in pass_checkpoint["teacher"].items()
                 if k.startswith("backbone.")}
    variants = {
        "converted": converted,
        "state_dict wrapper": {"state_dict": converted, "epoch": 7},
        "model wrapper, DDP prefixes": {"model": {f"module.{k}": v for k, v in converted.items()}},
        "model wrapper around a PASS checkpoint": {"model": pass_checkpoint},
    }
    for name, obj in variants.items():
        state, _ = extract_backbone_state_dict(obj)
        assert set(state) == set(teacher_weights), name
        assert all(torch.equal(state[k], teacher_weights[k]) for k in state), name


def test_export_round_trip(tmp_path):
    source = tiny(stride_size=12, img_size=(384, 128))
    export = export_backbone(source, "vit_tiny", epoch=100)
    assert export["arch"] == "vit_tiny" and export["img_size"] == [384, 128]
    assert export["stride_size"] == 12 and export["num_part_tokens"] == 3 and export["epoch"] == 100
    torch.save(export, tmp_path / "backbone.pth")
    torch.manual_seed(123)
    target = build_vit("vit_tiny", stride_size=12, img_size=(384, 128))
    report = load_pretrained(target, tmp_path / "backbone.pth")
    assert report.is_exact and not report.resized and not report.dropped
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    with pytest.raises(ValueError, match="overwrite"):
        export_backbone(source, "vit_tiny", backbone={})
    # The recorded 384x128 stride-12 grid (31x10) is used for the resize; hw_ratio could not infer it.
    report = load_pretrained(tiny(), export, hw_ratio=2)
    assert report.resized == [("pos_embed", (31, 10), (16, 8))]
    with pytest.raises(CheckpointMismatchError, match="hw_ratio"):
        load_pretrained(tiny(), export["backbone"], hw_ratio=2)


# ------------------------------------------------------------- loud mismatches
def test_missing_key_raises_and_lists_it(teacher_weights):
    partial = {k: v for k, v in teacher_weights.items() if k not in ("part_token3", "blocks.2.norm1.bias")}
    with pytest.raises(CheckpointMismatchError) as error:
        load_pretrained(tiny().double(), partial)
    assert "part_token3" in str(error.value) and "blocks.2.norm1.bias" in str(error.value)

    model = tiny().double()
    kept_init = model.part_token3.detach().clone()
    report = load_pretrained(model, partial, allow_missing=("part_token*", "blocks.2.norm1.bias"))
    assert sorted(report.missing) == ["blocks.2.norm1.bias", "part_token3"]
    assert torch.equal(model.part_token3.detach(), kept_init)
    torch.testing.assert_close(model.part_token1.detach(), teacher_weights["part_token1"])
    assert not report.is_exact


def test_unexpected_key_raises_unless_allowed(teacher_weights):
    extra = dict(teacher_weights, **{"blocks.9.attn.qkv.weight": torch.zeros(3)})
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.9\.attn\.qkv\.weight \(unexpected\)"):
        load_pretrained(tiny().double(), extra)
    report = load_pretrained(tiny().double(), extra, allow_unexpected=("blocks.9.*",))
    assert report.unexpected == ["blocks.9.attn.qkv.weight"]


def test_shape_mismatch_is_reported_with_both_shapes(teacher_weights):
    wrong = dict(teacher_weights, **{"norm.weight": torch.ones(DIM + 1, dtype=torch.float64)})
    with pytest.raises(CheckpointMismatchError, match="norm.weight") as error:
        load_pretrained(tiny().double(), wrong)
    assert f"checkpoint [{DIM + 1}] vs model [{DIM}]" in str(error.value)
    model = tiny().double()
    report = load_pretrained(model, wrong, allow_missing=("norm.weight",))
    assert report.shape_mismatched == [("norm.weight", (DIM + 1,), (DIM,))]
    assert torch.all(model.norm.weight == 1)  # kept its own init


def test_summary_reports_loaded_count_and_is_logged(teacher_weights, caplog):
    partial = {k: v for k, v in teacher_weights.items() if k != "cls_pos"}
    with caplog.at_level(logging.INFO, logger="passreid.models.checkpoint"):
        report = load_pretrained(tiny().double(), partial, allow_missing=("cls_pos",))
    total = len(teacher_weights)
    assert report.summary().startswith(f"Loaded {total - 1} / {total} tensors")
    assert f"Loaded {total - 1} / {total} tensors" in caplog.text
    assert "missing in checkpoint (1): cls_pos" in caplog.text


def test_summary_groups_the_dropped_heads(pass_checkpoint):
    report = load_pretrained(tiny().double(), pass_checkpoint)
    heads = [key for key in report.dropped if key.startswith("teacher.head.")]
    assert len(heads) >= 4  # every head tensor is still listed in the report itself
    line = next(line for line in report.summary().splitlines() if "dropped before matching" in line)
    assert f"teacher.head.* ({len(heads)})" in line and "student/*" in line and "teacher.head.mlp" not in line
    # Small groups and entries that carry a reason stay whole.
    keys = ["a.b.w", "a.b.v", "base.fc.weight (unused: ImageNet classifier)", "c.d.1", "c.d.2", "c.d.3", "c.d.4"]
    assert LoadReport("x", dropped=keys).summary().endswith(
        "dropped before matching (7): a.b.w, a.b.v, base.fc.weight (unused: ImageNet classifier), c.d.* (4)")


# -------------------------------------------------------------- position resize
def manual_bilinear_rows(grid: torch.Tensor, out_rows: int) -> torch.Tensor:
    """Linear resampling along dim 0 (align_corners=False; negative source clamped to 0)."""
    in_rows = grid.shape[0]
    rows = []
    for i in range(out_rows):
        source = max((i + 0.5) * in_rows / out_rows - 0.5, 0.0)
        low = int(math.floor(source))
        high = min(low + 1, in_rows - 1)
        frac = source - low
        rows.append((1 - frac) * grid[low] + frac * grid[high])
    return torch.stack(rows)


def test_pos_embed_resized_16x8_to_24x8_for_384x128(teacher_weights):
    model = tiny(img_size=(384, 128)).double()
    report = load_pretrained(model, teacher_weights, hw_ratio=2)
    assert report.resized == [("pos_embed", (16, 8), (24, 8))]
    assert report.is_exact  # a resize is not a mismatch
    grid = teacher_weights["pos_embed"][0].reshape(16, 8, DIM)
    expected = manual_bilinear_rows(grid, 24).reshape(1, 24 * 8, DIM)  # width 8 -> 8 is the identity
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=1e-12, atol=1e-12)
    assert "resized pos_embed: grid 16x8 -> 24x8" in report.summary()


def test_pretrain_grid_inference():
    assert infer_pretrain_grid(128, 2) == (16, 8)
    assert infer_pretrain_grid(192, 3) == (24, 8)
    assert infer_pretrain_grid(196, 2) == (14, 14)  # square timm grid as the fallback
    with pytest.raises(CheckpointMismatchError, match="hw_ratio"):
        infer_pretrain_grid(130, 2)


# ---------------------------------------------------------------- timm layout
@pytest.fixture(scope="module")
def timm_vit_small():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False).eval()


def test_timm_state_dict_into_plain_vit_small(timm_vit_small):
    timm_state = timm_vit_small.state_dict()
    model = build_vit("vit_small", num_part_tokens=0).eval()
    report = load_pretrained(model, timm_state)
    assert report.resized == [("pos_embed", (14, 14), (16, 8))]
    assert sorted(report.dropped) == ["head.bias", "head.weight"]
    assert report.is_exact
    torch.testing.assert_close(model.cls_pos.detach(), timm_state["pos_embed"][:, :1])
    grid = timm_state["pos_embed"][0, 1:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(16, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.pos_embed.detach(), expected.permute(0, 2, 3, 1).reshape(1, 128, 384))


def test_timm_state_dict_part_tokens_missing_unless_allowed(timm_vit_small):
    timm_state = timm_vit_small.state_dict()
    model = build_vit("vit_small")
    with pytest.raises(CheckpointMismatchError) as error:
        load_pretrained(model, timm_state)
    for name in ("part_token1", "part_token2", "part_token3", "part1_pos", "part2_pos", "part3_pos"):
        assert name in str(error.value)
    report = load_pretrained(model, timm_state, allow_missing=("part*",))
    assert len(report.missing) == 6 and len(report.loaded) == report.num_model_tensors - 6


def test_timm_weights_reproduce_timm_forward(timm_vit_small):
    # Same weights, same 224x224 grid: our [CLS] output must equal timm's own final-LN [CLS].
    model = build_vit("vit_small", img_size=224, num_part_tokens=0).eval()
    load_pretrained(model, timm_vit_small.state_dict())
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = timm_vit_small.forward_features(image)[:, 0]
        torch.testing.assert_close(model(image)[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_distillation_token_and_slot_are_dropped():
    torch.manual_seed(0)
    source = tiny(img_size=224, num_part_tokens=0)
    state = {k: v for k, v in source.state_dict().items() if k != "cls_pos"}
    state["pos_embed"] = torch.cat([source.cls_pos, torch.randn(1, 1, DIM), source.pos_embed], dim=1)
    state["dist_token"] = torch.randn(1, 1, DIM)
    state["head_dist.weight"] = torch.randn(10, DIM)
    extracted, dropped = extract_backbone_state_dict(state)
    assert {"dist_token", "head_dist.weight", "pos_embed[distillation-token slot]"} <= set(dropped)
    assert torch.equal(extracted["cls_pos"], source.cls_pos.detach())
    assert torch.equal(extracted["pos_embed"], source.pos_embed.detach())


# ----------------------------------------------------------------- bad sources
def test_bad_sources_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_pretrained(tiny(), tmp_path / "nowhere.pth")
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": {}, "when": datetime.date(2020, 1, 1)}, unsafe)
    with pytest.raises(CheckpointFormatError, match="weights_only=False"):
        read_checkpoint(unsafe)
    assert read_checkpoint(unsafe, weights_only=False)["when"] == datetime.date(2020, 1, 1)
    with pytest.raises(CheckpointFormatError, match="'lr' \\(float\\)"):
        extract_backbone_state_dict({"cls_token": torch.zeros(1), "lr": 0.1})
    with pytest.raises(CheckpointFormatError, match="no 'teacher'"):
        extract_backbone_state_dict({"student": {}})
    with pytest.raises(TypeError, match="path or a checkpoint dict"):
        load_pretrained(tiny(), 42)


def test_weights_only_allows_namespace_and_numpy_scalars_and_nothing_more(tmp_path):
    """``args`` (argparse.Namespace) is a bag of attributes whose values are unpickled under the same rules, and
    numpy numeric scalars are values: both load. Anything else inside them, numpy arrays included, is refused and
    named, so allowing them opens no arbitrary unpickling."""
    allowed = {"args": argparse.Namespace(arch="vit_small", lr=np.float32(5e-4), crops=(0.4, 1.0), fp16=True),
               "lr": np.float64(1e-3), "step": np.int64(7), "ok": np.bool_(True), "w": torch.ones(2)}
    torch.save(allowed, tmp_path / "allowed.pth")
    loaded = read_checkpoint(tmp_path / "allowed.pth")
    assert loaded["args"] == allowed["args"] and loaded["lr"] == np.float64(1e-3) and loaded["step"].dtype == np.int64
    refused = {
        "array.pth": ({"lr": np.linspace(0.0, 1.0, 4)}, "numpy.ndarray"),
        "namespace_with_date.pth": ({"args": argparse.Namespace(when=datetime.date(2020, 1, 1))}, "datetime.date"),
    }
    for name, (obj, global_name) in refused.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointFormatError, match=f"{name} pickles objects that weights-only loading refuses: "
                                                        f".*{global_name}"):
            read_checkpoint(tmp_path / name)


def test_weights_only_reads_a_yacs_config_without_yacs(tmp_path):
    """torchreid (BPBReID) pickles its yacs CfgNode config: its items come back as nested OrderedDicts and no yacs
    code runs (none is installed); a value the safe loader does not allow inside it is still refused and named."""
    with yacs_config() as node:
        torch.save({"config": torchreid_config(node), "rank1": np.float32(0.9)}, tmp_path / "torchreid.pth")
        torch.save({"config": node({"data": {"when": datetime.date(2020, 1, 1)}})}, tmp_path / "date.pth")
    config = read_checkpoint(tmp_path / "torchreid.pth")["config"]
    assert isinstance(config, OrderedDict) and isinstance(config["model"]["bpbreid"], OrderedDict)
    assert config["model"]["bpbreid"]["test_embeddings"] == ["bn_foreg", "parts"]
    assert config["model"]["bpbreid"]["masks"]["parts_num"] == 5 and config["data"]["height"] == 384
    with pytest.raises(CheckpointFormatError, match="date.pth pickles objects that weights-only loading refuses: "
                                                    "datetime.date"):
        read_checkpoint(tmp_path / "date.pth")
