"""BPBReID: shapes, published loss terms and weights, visibility, test distance, schedule, training on the ViT;
the published CNN backbones (HRNet-W32, ResNet-50): feature maps, a training step, weight files, recipes."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from passreid.config import ConfigError, load_config
from passreid.eval import rank_metrics_from_distance
from passreid.eval.evaluator import extract_split
from passreid.eval.features import ExtractedFeatures
from passreid.finetune import FinetuneConfig, build_criterion, build_model, get_method, run_training, validate_config
from passreid.finetune.bpbreid import (BPBReIDModel, body_part_attention_loss, pack_part_rows,
                                       part_averaged_triplet_loss, unpack_part_rows)
from passreid.finetune.optim import epoch_learning_rates
from passreid.models import CheckpointMismatchError
from passreid.models.cnn import build_cnn_backbone
from passreid.models.factory import load_backbone_weights

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "finetune"
HRNET_RECIPES = sorted(CONFIGS.glob("*/bpbreid_hrnet32_384.yaml"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    assert cfg.optim.lr_stepping == "pass"  # epoch e runs at the schedule's value e
    factors = [epoch_learning_rates(cfg.optim, e, cfg.train.epochs, [cfg.optim.lr])[0] / 3.5e-4
               for e in (0, 5, 10, 39, 40, 69, 70, 119)]
    assert factors == pytest.approx([0.01, 0.01 + 0.99 * 0.5, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.slow
def test_short_training_on_the_generated_occluded_world_uses_the_part_distance(tmp_path, synthetic_world):
    world = synthetic_world
    common = [f"data.root={world}/market_occluded", "train.epochs=8", "eval.period=8", "optim.warmup_epochs=1"]
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
    # The comparison with the baseline at the demo's budget is finetune/README.md's table (one run each).
    print(f"\ngenerated market_occluded, 8 epochs: bpbreid mAP {result.final_metrics['mAP']:.3f}")


# ------------------------------------------------------------- published CNN backbones


@pytest.fixture(scope="module")
def hrnet():
    torch.manual_seed(0)
    return build_cnn_backbone("hrnet_w32").eval()


def _recipe(name: str, *overrides: str) -> FinetuneConfig:
    return validate_config(load_config(FinetuneConfig, CONFIGS / name, list(overrides)))


@pytest.mark.parametrize("arch, shape", [("hrnet_w32", (1920, 96, 32)), ("resnet50", (2048, 24, 8))])
def test_backbone_gives_the_published_feature_map_at_384x128(arch, shape, hrnet):
    # bpbreid: HRNet-W32 -> 1920 channels at stride 4; ResNet-50 with last stride 1 -> 2048 at stride 16
    backbone = hrnet if arch == "hrnet_w32" else build_cnn_backbone(arch).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 384, 128))
    assert features.shape == (1, *shape)
    assert backbone.out_channels == shape[0] and 384 // backbone.stride == shape[1]


def test_hrnet_map_concatenates_the_four_upsampled_branches(hrnet):
    # Independent path: timm's own feature extractor with the same weights, fused as in bpbreid's hrnet.py.
    reference = timm.create_model("hrnet_w32", pretrained=False, features_only=True, feature_location="incre",
                                  out_indices=(1, 2, 3, 4)).eval()
    reference.load_state_dict(hrnet.state_dict())
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        branches = reference(images)
        expected = torch.cat([branches[0]] + [F.interpolate(f, size=branches[0].shape[2:], mode="bilinear",
                                                            align_corners=True) for f in branches[1:]], dim=1)
        actual = hrnet(images)
    assert [f.shape[1] for f in branches] == [128, 256, 512, 1024]
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)  # the same ops on the same weights


def test_training_step_with_hrnet_on_cpu():
    # The published Occluded-Duke recipe on a tiny 64x32 input (feature map 16x8) to keep the CPU test short.
    cfg = _recipe("occluded_duke/bpbreid_hrnet32_384.yaml", "model.img_size=[64,32]")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=2, num_cameras=2, load_weights=False)
    assert isinstance(model, BPBReIDModel) and model.num_parts == 8
    criterion = build_criterion(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    images, labels = torch.randn(4, 3, 64, 32), torch.tensor([0, 0, 1, 1])
    masks = torch.rand(4, 9, 16, 8).softmax(dim=1)  # K+1 channels at 1/4 resolution (data.mask_scale)
    before = model.backbone.conv1.weight.detach().clone()
    output = model.train()(images, masks=masks)
    assert output.pixel_scores.shape == (4, 9, 16, 8)  # stride-4 HRNet map of 64x32
    terms = criterion(output, labels)
    assert {"id_global", "id_foreground", "id_concat", "triplet_parts", "pixel_ce"} <= set(terms)
    assert "triplet_foreground" not in terms  # the Occluded-Duke config has no foreground triplet
    optimizer.zero_grad()
    terms["loss"].backward()
    optimizer.step()
    assert bool(torch.isfinite(terms["loss"]))
    assert not torch.equal(model.backbone.conv1.weight, before)
    rows = model.eval()(images)
    feats, visibility = unpack_part_rows(rows, 9)
    assert feats.shape == (4, 9, 512) and visibility.shape == (4, 9)


def _resnet_cfg(weights: Path) -> FinetuneConfig:
    return _recipe("market1501/bpbreid_hrnet32_384.yaml", "model.arch=resnet50", f"model.pretrained={weights}")


def _imagenet_style_state(backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What torchvision's resnet50 file holds: the backbone, the classifier, no BatchNorm step counters."""
    state = {k: v.clone() for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    return {**state, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}


def test_imagenet_weights_file_loads_and_a_wrong_key_is_an_error_naming_it(tmp_path, caplog):
    torch.manual_seed(0)
    source = build_cnn_backbone("resnet50")
    target = build_cnn_backbone("resnet50")
    path = tmp_path / "resnet50.pth"

    torch.save(_imagenet_style_state(source), path)
    with caplog.at_level(logging.WARNING):
        report = load_backbone_weights(target, _resnet_cfg(path).model)
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"] and "fc.weight" in caplog.text
    torch.testing.assert_close(target.layer4[2].conv3.weight, source.layer4[2].conv3.weight, rtol=0, atol=0)

    state = _imagenet_style_state(source)
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"layer5\.0\.conv1\.weight \(unexpected\)"):
        load_backbone_weights(target, _resnet_cfg(path).model)

    state = _imagenet_style_state(source)
    del state["layer4.2.bn3.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"not allowed: layer4\.2\.bn3\.weight"):
        load_backbone_weights(target, _resnet_cfg(path).model)


@pytest.mark.parametrize("path", HRNET_RECIPES, ids=lambda p: p.parent.name)
def test_published_hrnet_recipes_resolve(path):
    cfg = validate_config(load_config(FinetuneConfig, path))
    dataset = path.parent.name
    # VlSomers/bpbreid configs/bpbreid/bpbreid_*_train.yaml and torchreid/scripts/default_config.py
    assert (cfg.method, cfg.model.arch, tuple(cfg.model.img_size)) == ("bpbreid", "hrnet_w32", (384, 128))
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.bias_lr_factor) == ("adam", 3.5e-4,
                                                                                                 5e-4, 1.0)
    assert (cfg.optim.scheduler, cfg.optim.milestones, cfg.optim.gamma) == ("warmup_multistep", [40, 70], 0.1)
    assert (cfg.optim.warmup_epochs, cfg.optim.warmup_lr_factor, cfg.train.epochs) == (10, 0.01, 120)
    assert (cfg.data.batch_size, cfg.data.num_instances) == (64, 4)
    assert tuple(cfg.data.pixel_mean) == (0.485, 0.456, 0.406) and tuple(cfg.data.pixel_std) == (0.229, 0.224, 0.225)
    assert (cfg.bpbreid.dim_reduce, cfg.bpbreid.label_smoothing, cfg.bpbreid.triplet_margin) == (512, 0.1, 0.3)
    parts = {"occluded_duke": "eight", "market1501": "five_v", "dukemtmcreid": "five_v", "occluded_reid": "eight"}
    assert cfg.data.mask_preprocess == parts[dataset]
    assert cfg.bpbreid.triplet_weight_foreground == (0.0 if dataset == "occluded_duke" else 1.0)
    assert cfg.bpbreid.pixel_ce_weight == (0.7 if dataset == "occluded_reid" else 0.35)
    assert cfg.data.flip_p == (0.5 if dataset == "occluded_reid" else 0.0)


def test_cnn_backbone_with_another_method_names_the_key():
    with pytest.raises(ConfigError, match="model.arch.*bpbreid only"):
        validate_config(load_config(FinetuneConfig, None, ["model.arch=hrnet_w32"]))
