"""BPBReID on the ViT: shapes, published loss terms and weights, visibility, test distance, schedule, training."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from passreid.config import load_config
from passreid.engine.schedules import WarmupMultiStepLR
from passreid.eval import rank_metrics_from_distance
from passreid.eval.features import ExtractedFeatures
from passreid.finetune import FinetuneConfig, build_criterion, build_model, get_method, run_training
from passreid.finetune.bpbreid import (BPBReIDModel, body_part_attention_loss, pack_part_rows,
                                       part_averaged_triplet_loss, unpack_part_rows)
from passreid.finetune.evaluator import extract_split
from passreid.finetune.optim import build_lr_scheduler

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "finetune"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _cfg(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, CONFIGS / "demo_bpbreid.yaml", list(overrides))


def test_shapes_and_initialisation():
    torch.manual_seed(0)
    model = build_model(_cfg(), num_classes=7, num_cameras=2)
    assert isinstance(model, BPBReIDModel) and model.num_parts == 5
    assert float(model.pixel_classifier.classifier.weight.detach().std()) == pytest.approx(0.001, rel=0.2)
    assert not model.foreground_classifier.bn.bias.requires_grad
    assert model.foreground_classifier.classifier.bias is None
    images, masks = torch.randn(4, 3, 128, 64), torch.rand(4, 6, 32, 16).softmax(1)
    out = model.train()(images, masks=masks)
    assert out.embeddings["global"].shape == out.embeddings["foreground"].shape == (4, 512)
    assert out.embeddings["parts"].shape == (4, 5, 512) and out.embeddings["concat"].shape == (4, 2560)
    assert out.logits["parts"].shape == (4, 5, 7) and out.logits["concat"].shape == (4, 7)
    assert out.pixel_scores.shape == (4, 6, 8, 4)          # K+1 channels on the 8x4 patch grid of 128x64
    assert out.visibility["parts"].shape == (4, 5) and out.target_masks is masks
    rows = model.eval()(images)
    assert rows.shape == (4, model.feature_dim) == (4, 6 * 512 + 6)
    feats, vis = unpack_part_rows(rows, 6)
    assert feats.shape == (4, 6, 512) and set(vis.unique().tolist()) <= {0.0, 1.0}
    assert bool((vis[:, 0] == 1).all())                      # foreground: max over all K+1 channels


def test_visibility_is_part_winning_some_pixel():
    model = build_model(_cfg(), 3, 1)
    attention = torch.rand(3, 6, 8, 4).softmax(1)
    attention[0, 2] = 0.0                                   # part 2 (channel 2) never wins in image 0
    vis = model.part_visibility(attention)
    for n in range(3):
        winners = attention[n].argmax(0)
        for c in range(6):
            assert float(vis[n, c]) == float((winners == c).any())
    assert float(vis[0, 2]) == 0.0


def test_loss_terms_and_published_weights():
    cfg = _cfg()
    criterion = build_criterion(cfg)
    assert criterion.id_weights == {"global": 1.0, "foreground": 1.0, "concat": 1.0}
    assert criterion.triplet_weights == {"parts": 1.0, "foreground": 0.0}
    assert (criterion.pixel_ce_weight, criterion.label_smoothing, criterion.triplet_margin) == (0.35, 0.1, 0.3)
    occ_reid = load_config(FinetuneConfig, CONFIGS / "occluded_reid" / "bpbreid_vit_b_256.yaml", [])
    assert build_criterion(occ_reid).pixel_ce_weight == 0.7
    assert build_criterion(occ_reid).triplet_weights["foreground"] == 1.0

    torch.manual_seed(1)
    model = build_model(cfg, 4, 1).train()
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    masks = torch.rand(8, 6, 32, 16).softmax(1)
    out = model(torch.randn(8, 3, 128, 64), masks=masks)
    terms = criterion(out, pids)
    assert set(terms) == {"loss", "id_global", "id_foreground", "id_concat", "triplet_parts", "pixel_ce", "acc"}
    for name in ("global", "foreground", "concat"):
        torch.testing.assert_close(terms[f"id_{name}"], F.cross_entropy(out.logits[name], pids, label_smoothing=0.1))
    expected = (terms["id_global"] + terms["id_foreground"] + terms["id_concat"] + terms["triplet_parts"]
                + 0.35 * terms["pixel_ce"])
    torch.testing.assert_close(terms["loss"], expected)
    with pytest.raises(ValueError, match="part masks"):
        out.target_masks = None
        criterion(out, pids)


def test_part_averaged_triplet_equals_brute_force():
    torch.manual_seed(2)
    parts, labels = torch.randn(8, 3, 5), torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    visibility = (torch.rand(8, 3) > 0.3).float()
    for vis in (None, visibility):
        losses = []
        for a in range(8):
            def dist(i, j):
                weights = [1.0] * 3 if vis is None else [float(vis[i, k] * vis[j, k]) for k in range(3)]
                if sum(weights) == 0:
                    return None
                return sum(w * float((parts[i, k] - parts[j, k]).norm()) for k, w in enumerate(weights)) / sum(weights)
            pos = [d for j in range(8) if j != a and labels[j] == labels[a] and (d := dist(a, j)) is not None]
            neg = [d for j in range(8) if labels[j] != labels[a] and (d := dist(a, j)) is not None]
            if pos and neg:
                losses.append(max(0.0, max(pos) - min(neg) + 0.3))
        got = part_averaged_triplet_loss(parts, labels, 0.3, vis)
        assert float(got) == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_body_part_attention_loss_targets():
    torch.manual_seed(3)
    scores, targets = torch.randn(2, 6, 8, 4), torch.rand(2, 6, 32, 16)
    labels = F.interpolate(targets, size=(8, 4), mode="bilinear", align_corners=True).argmax(1)
    expected = F.cross_entropy(scores, labels, label_smoothing=0.1)
    torch.testing.assert_close(body_part_attention_loss(scores, targets, 0.1), expected)


def test_test_distance_via_the_method_equals_brute_force():
    torch.manual_seed(4)
    cfg = _cfg("bpbreid.dim_reduce=6")
    q_parts, g_parts = torch.randn(5, 6, 6), torch.randn(7, 6, 6)
    q_vis, g_vis = (torch.rand(5, 6) > 0.4).float(), (torch.rand(7, 6) > 0.4).float()
    q_vis[0], g_vis[0] = 0.0, 0.0                            # no common part at all: ranks last
    q_vis[0, 3], g_vis[0, 2] = 1.0, 1.0
    as_feats = lambda rows: ExtractedFeatures(rows, torch.zeros(len(rows)), torch.zeros(len(rows)))  # noqa: E731
    distance = get_method("bpbreid").build_test_distance(cfg, as_feats(pack_part_rows(q_parts, q_vis)),
                                                         as_feats(pack_part_rows(g_parts, g_vis)), "cpu")
    got = distance(0, 5)
    qn, gn = F.normalize(q_parts, dim=2), F.normalize(g_parts, dim=2)
    for i in range(5):
        for j in range(7):
            common = [k for k in range(6) if q_vis[i, k] and g_vis[j, k]]
            if not common:
                assert float(got[i, j]) > 2.0               # beyond every real (normalised) distance
                continue
            expected = sum(float((qn[i, k] - gn[j, k]).norm()) for k in common) / len(common)
            assert float(got[i, j]) == pytest.approx(expected, abs=1e-5)


def test_warmup_multistep_schedule_as_published():
    cfg = load_config(FinetuneConfig, CONFIGS / "occluded_duke" / "bpbreid_vit_b_256.yaml", [])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.train.epochs) == ("adam", 3.5e-4, 5e-4, 120)
    assert cfg.data.mask_preprocess == "eight" and cfg.data.flip_p == 0.0
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.epochs)
    assert isinstance(scheduler, WarmupMultiStepLR)
    factors = [scheduler.lrs_at(e)[0] / 3.5e-4 for e in (0, 5, 10, 39, 40, 69, 70, 119)]
    assert factors == pytest.approx([0.01, 0.01 + 0.99 * 0.5, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.slow
def test_short_training_on_the_generated_occluded_world_uses_the_part_distance(tmp_path):
    world = tmp_path / "world"
    common = [f"data.world_dir={world}", "train.epochs=8", "eval.period=8", "optim.warmup_epochs=1"]
    cfg = _cfg(f"train.output_dir={tmp_path / 'bpbreid'}", *common)
    result = run_training(cfg)
    assert result.final_model is not None and 0.0 <= result.final_metrics["mAP"] <= 1.0
    # The reported mAP is the one of the visibility-aware distance over the eval rows.
    from passreid.finetune import load_finetuned_model
    from passreid.finetune.data import load_finetune_data

    model, stored, _ = load_finetuned_model(result.final_model)
    test = load_finetune_data(stored).test
    q = extract_split(model, test.query, (128, 64), stored, torch.device("cpu"))
    g = extract_split(model, test.gallery, (128, 64), stored, torch.device("cpu"))
    distance = get_method("bpbreid").build_test_distance(stored, q, g, None)
    manual = rank_metrics_from_distance(distance, q.pids, g.pids, q.camids, g.camids, device="cpu")
    assert manual.mAP == pytest.approx(result.final_metrics["mAP"], abs=1e-6)
    baseline = run_training(load_config(FinetuneConfig, CONFIGS / "demo_occluded.yaml",
                                        [f"train.output_dir={tmp_path / 'baseline'}", *common]))
    print(f"\ngenerated market_occluded, 8 epochs: bpbreid mAP {result.final_metrics['mAP']:.3f}, "
          f"demo_occluded baseline mAP {baseline.final_metrics['mAP']:.3f}")
