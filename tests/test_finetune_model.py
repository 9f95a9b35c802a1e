"""Fine-tuning model: PASS head fusion, BNNeck init, SIE, JPM rearrangement and output shapes."""
from __future__ import annotations

import pytest
import torch

from passreid.models import build_vit
from passreid.models.reid import (JigsawBranches, ReIDModel, TokenHead, jigsaw_rearrange, make_bnneck, make_classifier,
                                  split_equal_chunks)

DIM = 8


def _tokens(batch: int = 5, num_tokens: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, num_tokens, DIM, generator=torch.Generator().manual_seed(seed))


def _train_bn_output(bn: torch.nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """What a fresh BN (weight 1, bias 0) gives in training mode: batch standardisation."""
    mean, var = x.mean(0), x.var(0, unbiased=False)
    return (x - mean) / torch.sqrt(var + bn.eps)


def _eval_bn_output(bn: torch.nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """What a BN with weight 1, bias 0 gives in eval mode: standardisation by its running statistics."""
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)


def test_bnneck_has_frozen_zero_bias_and_unit_weight():
    bn = make_bnneck(16)
    assert not bn.bias.requires_grad and bn.weight.requires_grad
    assert torch.equal(bn.bias, torch.zeros(16)) and torch.equal(bn.weight, torch.ones(16))


def test_classifier_is_bias_free_with_small_normal_init():
    torch.manual_seed(0)
    classifier = make_classifier(512, 400)
    assert classifier.bias is None and classifier.weight.shape == (400, 512)
    assert classifier.weight.std().item() == pytest.approx(0.001, rel=0.02)
    assert abs(classifier.weight.mean().item()) < 1e-4


def test_pass_head_cat_fusion_values():
    head = TokenHead(DIM, num_classes=7, num_parts=3, fusion="cat", multi_neck=True).train()
    tokens = _tokens()
    out = head(tokens)
    cls, parts = tokens[:, 0], tokens[:, 1:4]
    assert out.before.shape == (5, 2 * DIM) and head.feature_dim == 2 * DIM
    torch.testing.assert_close(out.before, torch.cat([cls, parts.mean(1)], dim=1))
    expected_after = torch.cat([
        _train_bn_output(head.necks[0], cls),
        (sum(_train_bn_output(head.necks[k], parts[:, k - 1]) for k in (1, 2, 3))) / 3,
    ], dim=1)
    torch.testing.assert_close(out.after, expected_after)
    assert head.classifier.weight.shape == (7, 2 * DIM)
    assert len(head.necks) == 4


def test_pass_head_mean_fusion_and_single_neck():
    tokens = _tokens()
    cls, parts = tokens[:, 0], tokens[:, 1:4]
    mean_head = TokenHead(DIM, 7, num_parts=3, fusion="mean").train()
    out = mean_head(tokens)
    torch.testing.assert_close(out.before, (cls + parts.mean(1)) / 2)
    expected_after = (_train_bn_output(mean_head.necks[0], cls)
                      + sum(_train_bn_output(mean_head.necks[k], parts[:, k - 1]) for k in (1, 2, 3)) / 3) / 2
    torch.testing.assert_close(out.after, expected_after)
    assert mean_head.feature_dim == DIM and mean_head.classifier.weight.shape == (7, DIM)

    single = TokenHead(DIM, 7, num_parts=3, fusion="cat", multi_neck=False).train()
    out = single(tokens)
    assert len(single.necks) == 1 and single.necks[0].num_features == 2 * DIM
    torch.testing.assert_close(out.after, _train_bn_output(single.necks[0], out.before))


def test_cls_head_uses_only_the_cls_token():
    head = TokenHead(DIM, 3).eval()
    tokens = _tokens()
    out = head(tokens)
    torch.testing.assert_close(out.before, tokens[:, 0])
    torch.testing.assert_close(out.after, tokens[:, 0] / (1 + head.necks[0].eps) ** 0.5)  # running stats 0/1


def _manual_rearrange(num_patches: int, shift: int, groups: int) -> list[int]:
    """Index of the original patch at every output position, from the definition."""
    shifted = list(range(shift - 1, num_patches)) + list(range(shift - 1))
    per_group = num_patches // groups
    return [shifted[g * per_group + j] for j in range(per_group) for g in range(groups)]


@pytest.mark.parametrize("num_patches,shift,groups", [(12, 5, 2), (128, 5, 2), (242, 5, 2), (12, 1, 3)])
def test_jigsaw_rearrange_matches_manual_index(num_patches, shift, groups):
    patches = torch.arange(num_patches, dtype=torch.float32).view(1, num_patches, 1).expand(2, -1, 3)
    out = jigsaw_rearrange(patches, shift, groups)
    expected = torch.tensor(_manual_rearrange(num_patches, shift, groups), dtype=torch.float32)
    assert torch.equal(out[0, :, 0], expected) and torch.equal(out[1, :, 2], expected)


def test_jigsaw_rearrange_small_worked_example():
    # 8 patches, shift 3: [2..7, 0, 1]; two groups [2,3,4,5] / [6,7,0,1] read column-wise.
    patches = torch.arange(8.0).view(1, 8, 1)
    assert jigsaw_rearrange(patches, 3, 2).flatten().tolist() == [2, 6, 3, 7, 4, 0, 5, 1]


def test_jigsaw_rearrange_pads_an_odd_sequence_like_transreid():
    # 7 patches, shift 2: [1..6, 0]; padded with its second-to-last token (6) to 8; read column-wise.
    patches = torch.arange(7.0).view(1, 7, 1)
    assert jigsaw_rearrange(patches, 2, 2).flatten().tolist() == [1, 5, 2, 6, 3, 0, 4, 6]


def test_split_equal_chunks_drops_the_remainder():
    tokens = torch.arange(10.0).view(1, 10, 1)
    chunks = split_equal_chunks(tokens, 4)
    assert [c.flatten().tolist() for c in chunks] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def _tiny_backbone(num_part_tokens: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("vit_tiny", img_size=(64, 32), num_part_tokens=num_part_tokens)


def test_reid_model_shapes_pass_and_cls_heads():
    images = torch.randn(4, 3, 64, 32)
    model = ReIDModel(_tiny_backbone(), num_classes=6, head="pass")
    out = model.train()(images)
    assert [lg.shape for lg in out.logits] == [(4, 6)] and out.feats[0].shape == (4, 2 * 192)
    assert out.weights == [1.0]
    assert model.eval()(images).shape == (4, model.feature_dim) == (4, 384)

    plain = ReIDModel(_tiny_backbone(0), num_classes=6, head="cls")
    assert plain.eval()(images).shape == (4, 192)
    with pytest.raises(ValueError, match="part tokens"):
        ReIDModel(_tiny_backbone(0), num_classes=6, head="pass")


def test_eval_feature_is_the_pre_bn_fused_feature():
    images = torch.randn(3, 3, 64, 32)
    model = ReIDModel(_tiny_backbone(), num_classes=6, head="pass").eval()
    tokens = model.backbone(images)
    torch.testing.assert_close(model(images), torch.cat([tokens[:, 0], tokens[:, 1:4].mean(1)], dim=1))
    # neck_feat="after" returns the BN necks' output instead. Fresh necks (running mean 0, var 1) would only
    # scale the feature by 1/sqrt(1 + eps), a 1e-5 change inside any float tolerance; trained-looking running
    # statistics make the two features differ by O(1), and the expected one is computed from the tokens.
    after = ReIDModel(_tiny_backbone(), num_classes=6, head="pass", neck_feat="after").eval()
    generator = torch.Generator().manual_seed(1)
    for neck in after.head.necks:
        neck.running_mean.copy_(torch.randn(neck.num_features, generator=generator))
        neck.running_var.uniform_(0.25, 4.0, generator=generator)
    necks, after_tokens = after.head.necks, after.backbone(images)
    part_bn = torch.stack([_eval_bn_output(necks[k], after_tokens[:, k]) for k in (1, 2, 3)], dim=1).mean(1)
    expected_after = torch.cat([_eval_bn_output(necks[0], after_tokens[:, 0]), part_bn], dim=1)
    torch.testing.assert_close(after(images), expected_after)
    assert (after(images) - model(images)).abs().max() > 0.1


def test_sie_adds_the_scaled_camera_embedding_to_every_token():
    backbone = _tiny_backbone()
    model = ReIDModel(backbone, num_classes=5, num_cameras=3, sie_coe=3.0).eval()
    images = torch.randn(2, 3, 64, 32)
    camids = torch.tensor([2, 0])
    assert model.sie_embed.shape == (3, 1, 192)
    expected = backbone.prepare_tokens(images) + 3.0 * model.sie_embed[camids]
    for block in backbone.blocks:
        expected = block(expected)
    torch.testing.assert_close(model.encode(images, backbone.depth, camids), expected)
    # Cameras change the features; unseen cameras and missing ids are errors.
    assert not torch.allclose(model(images, camids=torch.tensor([0, 0])), model(images, camids=torch.tensor([1, 1])))
    with pytest.raises(ValueError, match="camera ids must be in 0..2"):
        model(images, camids=torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="pass the images' camera ids"):
        model(images)


def test_jpm_shapes_weights_and_test_feature():
    backbone = _tiny_backbone(0)
    model = ReIDModel(backbone, num_classes=5, head="cls", jpm=True, jpm_num_branches=4, jpm_shift=2,
                      jpm_shuffle_groups=2)
    images = torch.randn(4, 3, 64, 32)  # 4x2 = 8 patches -> 4 chunks of 2
    out = model.train()(images)
    assert len(out.logits) == 5 and all(lg.shape == (4, 5) for lg in out.logits)
    assert all(f.shape == (4, 192) for f in out.feats)
    assert out.weights == [0.5, 0.125, 0.125, 0.125, 0.125]
    model.eval()
    feats = model(images)
    assert feats.shape == (4, 5 * 192) == (4, model.feature_dim)
    # Test feature = cat(g, l_i / 4) with the pre-BN features of each branch.
    branches = model.branch_outputs(images)
    expected = torch.cat([branches[0].before] + [b.before / 4 for b in branches[1:]], dim=1)
    torch.testing.assert_close(feats, expected)


def test_jpm_branches_see_cls_plus_their_chunk_through_the_copied_block():
    backbone = _tiny_backbone(0).eval()
    branches = JigsawBranches(backbone.blocks[-1], backbone.norm, 192, num_classes=3, num_branches=2,
                              shift=3, groups=2).eval()
    assert branches.block is not backbone.blocks[-1]
    torch.testing.assert_close(branches.block.attn.qkv.weight, backbone.blocks[-1].attn.qkv.weight)
    cls = torch.randn(2, 1, 192)
    patches = torch.randn(2, 8, 192)
    outputs = branches(cls, patches)
    order = _manual_rearrange(8, 3, 2)
    for index, out in enumerate(outputs):
        chunk = patches[:, order[index * 4:(index + 1) * 4]]
        tokens = backbone.norm(backbone.blocks[-1](torch.cat([cls, chunk], dim=1)))
        torch.testing.assert_close(out.before, tokens[:, 0])


def test_jpm_global_branch_uses_all_but_last_block_then_the_last_block():
    backbone = _tiny_backbone(0)
    model = ReIDModel(backbone, num_classes=5, head="cls", jpm=True, jpm_num_branches=2).eval()
    images = torch.randn(2, 3, 64, 32)
    features = backbone.forward_until(images, backbone.depth - 1)
    expected_global = backbone.norm(backbone.blocks[-1](features))[:, 0]
    torch.testing.assert_close(model.branch_outputs(images)[0].before, expected_global)
    torch.testing.assert_close(expected_global, backbone(images)[:, 0])
