"""Structure and behaviour of the one ViT (passreid.models.vit).

The exact maths of the forward pass is pinned against a slow manual re-computation in
tests/test_checkpoint_loading.py (it needs the PASS-layout checkpoint built there).
"""
from __future__ import annotations

import pytest
import torch

from passreid.models import VisionTransformer, build_vit, interpolate_pos_grid, list_vit_archs

TINY_DIM = 192


def tiny(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return build_vit("vit_tiny", **kwargs).eval()


def pass_parameter_names(depth: int, num_part_tokens: int = 3) -> set[str]:
    """Backbone parameter names of the published PASS ViT (PASS-reID: PASS/vision_transformer.py, as
    PASS/convert_model_dino.py writes them)."""
    names = {"cls_token", "cls_pos", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
             "norm.weight", "norm.bias"}
    for i in range(1, num_part_tokens + 1):
        names |= {f"part_token{i}", f"part{i}_pos"}
    for b in range(depth):
        for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names |= {f"blocks.{b}.{layer}.weight", f"blocks.{b}.{layer}.bias"}
    return names


def count_parameters(arch: str, **kwargs) -> int:
    with torch.device("meta"):  # counting needs no memory or initialisation
        model = build_vit(arch, **kwargs)
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ architecture
def test_parameter_counts_match_reference_values():
    # Counted from the parameter shapes of PASS-reID: PASS/vision_transformer.py (vit_small / vit_base):
    # backbone with 3 part tokens at 256x128, patch 16.
    assert count_parameters("vit_small") == 21_641_856
    assert count_parameters("vit_base") == 85_751_040
    # Dropping the 3 part tokens and their positions removes 6 * D parameters.
    assert count_parameters("vit_small", num_part_tokens=0) == 21_641_856 - 6 * 384


def test_parameter_names_are_the_published_pass_names():
    model = tiny()
    assert set(model.state_dict()) == pass_parameter_names(depth=4)
    assert model.pos_embed.shape == (1, 128, TINY_DIM)
    for name in ("cls_token", "cls_pos", "part_token1", "part3_pos"):
        assert getattr(model, name).shape == (1, 1, TINY_DIM)
    plain = tiny(num_part_tokens=0)
    assert set(plain.state_dict()) == pass_parameter_names(depth=4, num_part_tokens=0)


def test_arch_registry_and_overrides():
    assert list_vit_archs() == ["vit_base", "vit_small", "vit_tiny"]
    with torch.device("meta"):
        small = build_vit("vit_small")
        custom = build_vit("vit_small", depth=2, img_size=224)
    assert (small.embed_dim, small.depth, small.num_heads) == (384, 12, 6)
    assert small.blocks[0].mlp.fc1.out_features == 4 * 384
    assert small.blocks[0].attn.qkv.bias is not None
    assert small.norm.eps == 1e-6 and small.blocks[3].norm1.eps == 1e-6
    assert custom.depth == 2 and custom.img_size == (224, 224) and custom.pos_grid == (14, 14)
    with pytest.raises(ValueError, match="unknown ViT arch 'vit_huge'"):
        build_vit("vit_huge")


def test_initialisation():
    torch.manual_seed(0)
    model = build_vit("vit_tiny")
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
        if isinstance(module, torch.nn.Linear):
            assert torch.all(module.bias == 0)
            assert abs(module.weight.std().item() - 0.02) < 0.002
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    tokens = torch.cat([model.cls_token, model.part_token1, model.part_token2, model.part_token3,
                        model.cls_pos, model.part1_pos, model.part2_pos, model.part3_pos]).flatten()
    assert 0.01 < tokens.std().item() < 0.03
    assert not torch.equal(model.part_token1, model.part_token2)


# ----------------------------------------------------------------------- tokens
@pytest.mark.parametrize(
    "img_size, stride, grid",
    [((256, 128), 16, (16, 8)), ((256, 128), 12, (21, 10)), ((256, 128), 11, (22, 11)),
     ((384, 128), 16, (24, 8)), ((384, 128), 12, (31, 10))],
)
def test_overlapping_patch_grid(img_size, stride, grid):
    model = tiny(img_size=img_size, stride_size=stride, depth=1)
    assert model.pos_grid == grid
    assert model.pos_embed.shape == (1, grid[0] * grid[1], TINY_DIM)
    tokens = model.forward_tokens(torch.randn(1, 3, *img_size))
    assert tokens.shape == (1, 4 + grid[0] * grid[1], TINY_DIM)


def test_output_shapes_global_local_plain():
    model = tiny(depth=1)
    images = torch.randn(2, 3, 256, 128)
    crops = torch.randn(3, 3, 128, 64)
    assert model(images).shape == (2, 4, TINY_DIM)
    assert model.forward_tokens(images).shape == (2, 4 + 128, TINY_DIM)
    for k in range(3):
        assert model(crops, part_index=k).shape == (3, 2, TINY_DIM)
        assert model.forward_tokens(crops, part_index=k).shape == (3, 2 + 32, TINY_DIM)
    plain = tiny(num_part_tokens=0, depth=1)
    assert plain(images).shape == (2, 1, TINY_DIM)
    assert plain.num_leading_tokens() == 1


def test_band_view_uses_only_its_own_part_token():
    model = tiny()
    crops = torch.randn(2, 3, 128, 64)
    before = model(crops, part_index=1)
    with torch.no_grad():
        model.part_token1.add_(1.0)
        model.part3_pos.add_(1.0)
    torch.testing.assert_close(model(crops, part_index=1), before, rtol=0, atol=0)
    with torch.no_grad():
        model.part_token2.add_(1.0)
    assert not torch.allclose(model(crops, part_index=1), before)


def test_per_image_part_index_is_each_image_in_its_own_band_pass():
    """A (B,) part_index gives every image the tokens of a pass with its band's int index (batch_band_views)."""
    model = tiny().eval()
    crops = torch.randn(6, 3, 128, 64)
    bands = torch.tensor([2, 0, 1, 1, 2, 0])
    batched = model.forward_tokens(crops, part_index=bands)
    assert batched.shape == (6, 2 + 32, TINY_DIM)
    for band in range(3):
        rows = (bands == band).nonzero().flatten()
        # the same per-image arithmetic in matmuls of another row count: float32 rounding only
        torch.testing.assert_close(batched[rows], model.forward_tokens(crops[rows], part_index=band),
                                   rtol=1e-5, atol=1e-5)


def test_global_view_token_order_is_cls_then_parts():
    model = tiny()
    images = torch.randn(1, 3, 256, 128)
    with torch.no_grad():  # make the four leading tokens distinguishable only by their token vector
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.mlp.fc2.weight.zero_()
        model.norm.weight.fill_(1.0)
    out = model(images)[0]
    expected = [model.cls_token + model.cls_pos] + [
        model.part_token(i) + model.part_pos(i) for i in range(3)]
    for index, token in enumerate(expected):
        torch.testing.assert_close(out[index], model.norm(token.reshape(-1)))


# ---------------------------------------------------------------- positions
def test_positions_added_unchanged_on_native_grid_without_quirk():
    model = tiny()
    assert model.patch_pos_embed((16, 8)) is model.pos_embed


def test_pass_quirk_resamples_even_the_native_grid():
    model = tiny(pass_interp_quirk=True, depth=1)
    resampled = model.patch_pos_embed((16, 8))
    assert resampled.shape == model.pos_embed.shape
    difference = (resampled - model.pos_embed).abs().max().item()
    assert 0 < difference < model.pos_embed.abs().max().item()  # near-identity, not identical
    images = torch.randn(1, 3, 256, 128)
    plain = tiny(pass_interp_quirk=False, depth=1)
    assert not torch.allclose(model(images), plain(images), atol=1e-7)


def test_local_view_positions_are_the_whole_grid_downsampled():
    model = tiny()
    local = model.patch_pos_embed((8, 4))
    assert local.shape == (1, 32, TINY_DIM)
    torch.testing.assert_close(local, interpolate_pos_grid(model.pos_embed, (16, 8), (8, 4)))


def test_interpolation_keeps_low_precision_dtype():
    pos = torch.randn(1, 128, 8, dtype=torch.bfloat16)
    out = interpolate_pos_grid(pos, (16, 8), (8, 4))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 32, 8)


# ------------------------------------------------------- intermediate outputs
def test_forward_until_and_intermediate_tokens_agree():
    model = tiny()
    images = torch.randn(2, 3, 256, 128)
    full = model.forward_until(images, model.depth)
    torch.testing.assert_close(model.norm(full), model.forward_tokens(images))
    torch.testing.assert_close(model.forward_until(images, 0), model.prepare_tokens(images))
    wanted = [3, 0, 2]
    outputs = model.get_intermediate_tokens(images, wanted)
    for index, tokens in zip(wanted, outputs):
        torch.testing.assert_close(tokens, model.forward_until(images, index + 1))
    # JPM: all but the last block, then the last block and the final LN.
    penultimate = model.forward_until(images, model.depth - 1)
    torch.testing.assert_close(model.norm(model.blocks[-1](penultimate)), model.forward_tokens(images))
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_tokens(images, [4])
    with pytest.raises(ValueError, match="n_blocks"):
        model.forward_until(images, 5)


def test_attention_probabilities_match_timm_unfused_attention():
    model = tiny()
    images = torch.randn(2, 3, 128, 64)
    block_index = 2
    tokens_in = model.forward_until(images, block_index, part_index=0)
    attn = model.blocks[block_index].attn
    captured = []
    attn.fused_attn = False  # timm's explicit path passes the softmax weights through attn_drop
    handle = attn.attn_drop.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        model.blocks[block_index](tokens_in)
    finally:
        handle.remove()
        attn.fused_attn = True
    probabilities = model.attention_probabilities(block_index, tokens_in)
    assert probabilities.shape == (2, 3, 34, 34)
    torch.testing.assert_close(probabilities, captured[0])
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 3, 34))


# -------------------------------------------------------------- drop path
def test_drop_path_rates_rise_linearly():
    model = build_vit("vit_tiny", drop_path_rate=0.3)
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert isinstance(model.blocks[0].drop_path1, torch.nn.Identity)
    assert [getattr(b.drop_path2, "drop_prob", 0.0) for b in model.blocks] == pytest.approx(rates)


def test_drop_path_is_stochastic_in_training_only():
    torch.manual_seed(0)
    model = build_vit("vit_tiny", drop_path_rate=0.5)
    images = torch.randn(4, 3, 128, 64)
    model.train()
    torch.manual_seed(1)
    first = model(images, part_index=2)
    torch.manual_seed(2)
    second = model(images, part_index=2)
    assert not torch.allclose(first, second)
    model.eval()
    torch.testing.assert_close(model(images, part_index=2), model(images, part_index=2), rtol=0, atol=0)
    no_drop = tiny(depth=2).train()
    torch.testing.assert_close(no_drop(images), no_drop(images), rtol=0, atol=0)


# ------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 256, 128))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 256, 128))
    with pytest.raises(ValueError, match="part_index must be in 0..2"):
        model(torch.randn(1, 3, 128, 64), part_index=3)
    with pytest.raises(ValueError, match="1-D long tensor"):
        model(torch.randn(2, 3, 128, 64), part_index=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="2 entries for 3 images"):
        model(torch.randn(3, 3, 128, 64), part_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no part tokens"):
        tiny(num_part_tokens=0)(torch.randn(1, 3, 128, 64), part_index=0)
    with pytest.raises(ValueError, match="smaller than the 16x16 patch"):
        model(torch.randn(1, 3, 8, 64))
    with pytest.raises(ValueError, match="divisible"):
        build_vit("vit_tiny", num_heads=5)
    with pytest.raises(ValueError, match="img_size"):
        build_vit("vit_tiny", img_size=(256, 128, 3))
