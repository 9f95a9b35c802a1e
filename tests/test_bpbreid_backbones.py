"""BPBReID's published CNN backbones (HRNet-W32, ResNet-50): feature maps, a training step, weight files, recipes."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from passreid.config import ConfigError, load_config
from passreid.finetune import FinetuneConfig, build_criterion, build_model, validate_config
from passreid.finetune.bpbreid import BPBReIDModel, unpack_part_rows
from passreid.finetune.methods import load_backbone_weights
from passreid.models import CheckpointMismatchError
from passreid.models.cnn import build_cnn_backbone

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"
HRNET_RECIPES = sorted(CONFIGS.glob("*/bpbreid_hrnet32_384.yaml"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
    # The published Occluded-DUKE recipe on a tiny 64x32 input (feature map 16x8) to keep the CPU test short.
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
        report = load_backbone_weights(target, _resnet_cfg(path))
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"] and "fc.weight" in caplog.text
    torch.testing.assert_close(target.layer4[2].conv3.weight, source.layer4[2].conv3.weight, rtol=0, atol=0)

    state = _imagenet_style_state(source)
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"layer5\.0\.conv1\.weight \(unexpected\)"):
        load_backbone_weights(target, _resnet_cfg(path))

    state = _imagenet_style_state(source)
    del state["layer4.2.bn3.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"not allowed: layer4\.2\.bn3\.weight"):
        load_backbone_weights(target, _resnet_cfg(path))


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
