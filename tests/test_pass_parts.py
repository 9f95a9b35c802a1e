"""PASS part tokens as parts: band visibility targets, shapes, loss terms, test distance, mask-free training."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from passreid.config import load_config
from passreid.eval.features import ExtractedFeatures
from passreid.finetune import FinetuneConfig, build_criterion, build_model, get_method, run_training
from passreid.finetune.bpbreid import pack_part_rows, unpack_part_rows
from passreid.finetune.data import build_train_set, load_finetune_data
from passreid.finetune.pass_parts import PassPartsModel, band_visibility_targets

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, CONFIGS / "demo_pass_parts.yaml", list(overrides))


def test_band_targets_equal_brute_force():
    torch.manual_seed(0)
    masks = torch.rand(3, 6, 32, 16)
    masks[1, 0] = 10.0                                       # image 1: all background
    masks[2, 0, 11:] = 10.0                                  # image 2: only the top band has a body
    got = band_visibility_targets(masks, 3, 0.3)
    edges = [0, 11, 21, 32]
    for n in range(3):
        for band in range(3):
            rows = masks[n, :, edges[band]:edges[band + 1]]
            share = float((rows.argmax(0) != 0).float().mean())
            assert float(got[n, band]) == float(share >= 0.3)
    assert got[1].tolist() == [0, 0, 0] and got[2].tolist() == [1, 0, 0]


def test_shapes_loss_terms_and_weights():
    torch.manual_seed(1)
    cfg = _cfg()
    model = build_model(cfg, 5, 2)
    assert isinstance(model, PassPartsModel)
    masks = torch.zeros(8, 6, 32, 16)
    masks[:, 1] = 1.0                                        # all body ...
    masks[:4, 0, 22:] = 5.0                                  # ... except the lower third of images 0-3
    out = model.train()(torch.randn(8, 3, 128, 64), masks=masks)
    assert out.part_logits.shape == (8, 3, 5) and out.visibility_logits.shape == (8, 3)
    assert out.visibility_targets[:4].tolist() == [[1, 1, 0]] * 4 and out.visibility_targets[4:].min() == 1
    criterion = build_criterion(cfg)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    terms = criterion(out, pids)
    visible = out.visibility_targets > 0.5
    part_id = F.cross_entropy(out.part_logits[visible], pids.unsqueeze(1).expand(8, 3)[visible])
    torch.testing.assert_close(terms["part_id"], part_id)
    bce = F.binary_cross_entropy_with_logits(out.visibility_logits, out.visibility_targets)
    torch.testing.assert_close(terms["visibility"], bce)
    torch.testing.assert_close(terms["loss"], terms["id"] + terms["triplet"] + part_id + bce)
    rows = model.eval()(torch.randn(2, 3, 128, 64))
    feats, vis = unpack_part_rows(rows, 4)
    assert rows.shape == (2, model.feature_dim) and feats.shape == (2, 4, 192)
    assert bool((vis[:, 0] == 1).all()) and bool(((vis >= 0) & (vis <= 1)).all())


def test_test_distance_via_the_method_equals_brute_force():
    torch.manual_seed(2)
    q_parts, g_parts = torch.randn(4, 4, 8), torch.randn(6, 4, 8)
    q_vis, g_vis = torch.rand(4, 4), torch.rand(6, 4)
    q_vis[:, 0], g_vis[:, 0] = 0.0, 0.0                      # the global token counts whatever its score
    feats = lambda rows: ExtractedFeatures(rows, torch.zeros(len(rows)), torch.zeros(len(rows)))  # noqa: E731
    distance = get_method("pass_parts").build_test_distance(_cfg(), feats(pack_part_rows(q_parts, q_vis)),
                                                            feats(pack_part_rows(g_parts, g_vis)), "cpu")
    got = distance(0, 4)
    qn, gn = F.normalize(q_parts, dim=2), F.normalize(g_parts, dim=2)
    for i in range(4):
        for j in range(6):
            common = [0] + [k for k in (1, 2, 3) if q_vis[i, k] >= 0.5 and g_vis[j, k] >= 0.5]
            expected = sum(float((qn[i, k] - gn[j, k]).norm()) for k in common) / len(common)
            assert float(got[i, j]) == pytest.approx(expected, abs=1e-5)


def test_erasing_target_needs_no_parsing_masks(tmp_path, synthetic_world):
    cfg = _cfg(f"data.root={synthetic_world}/market_occluded", f"train.output_dir={tmp_path / 'run'}",
               "pass_parts.visibility_target=erasing", "data.masks_dir=does_not_exist")
    data = load_finetune_data(cfg)
    train_set = build_train_set(data.train.train, cfg)
    torch.manual_seed(0)
    sample = train_set[0]
    assert sample["masks"].shape == (2, 32, 16)              # [background, foreground] from the augmentation
    with pytest.raises(ValueError, match="no parsing mask"):
        build_train_set(data.train.train, _cfg("data.masks_dir=does_not_exist"))


@pytest.mark.slow
def test_short_training_on_the_generated_occluded_world(tmp_path, synthetic_world):
    cfg = _cfg(f"data.root={synthetic_world}/market_occluded", f"train.output_dir={tmp_path / 'run'}", "train.epochs=4",
               "eval.period=4", "optim.warmup_epochs=1")
    result = run_training(cfg)
    assert result.final_model is not None and 0.0 <= result.final_metrics["mAP"] <= 1.0
    print(f"\ngenerated market_occluded, 4 epochs: pass_parts mAP {result.final_metrics['mAP']:.3f}")
