"""model_final.pth round trips and the explicit mapping of released checkpoints: TransReID / PASS-reID, DPM, TSD,
DPEFormer and BPBReID (torchreid, with its yacs config), and the refusal of files that do not fit the config."""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from _inference_models import (restored_passreid_logging, save_backbone_export, save_published_pass_checkpoint,
                               save_published_transreid_checkpoint, tiny_pass_vit)
from _released_checkpoints import (bpbreid_released_checkpoint, bpbreid_released_state, dpeformer_released_state,
                                   dpm_released_state, torchreid_config, tsd_released_state, yacs_config)
from _tool_loading import load_tool_module
from passreid.config import load_config
from passreid.engine import atomic_save
from passreid.finetune import FinetuneConfig, build_final_checkpoint, build_model, load_finetuned_model
from passreid.finetune.checkpoints import stored_config
from passreid.finetune.published_checkpoints import PUBLISHED_LAYOUTS, map_published_state_dict, published_layout
from passreid.models import CheckpointFormatError, CheckpointMismatchError

REPO = Path(__file__).resolve().parents[1]

TINY = ["model.arch=vit_tiny", "model.img_size=[64,32]", "model.drop_path_rate=0.0", "model.pretrained=none"]
JPM_SIE = ["model.head=cls", "model.num_part_tokens=0", "model.jpm=true", "model.jpm_shift=2",
           "model.sie_camera=true"]


def _cfg(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [*TINY, *overrides])


def _trained_looking_model(cfg: FinetuneConfig, num_classes: int = 7, num_cameras: int = 3) -> torch.nn.Module:
    """A model whose BN running statistics and weights are not at their init values."""
    torch.manual_seed(0)
    model = build_model(cfg, num_classes, num_cameras, load_weights=False)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn_like(tensor))
            if name.endswith("running_var"):
                tensor.abs_().add_(0.5)
    return model.eval()


def _features(model: torch.nn.Module, sie: bool) -> torch.Tensor:
    images = torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    camids = torch.tensor([0, 2, 1, 2]) if sie else None
    with torch.no_grad():
        return model.eval()(images, camids=camids)


@pytest.mark.parametrize("overrides,sie", [((), False), (JPM_SIE, True)])
def test_model_final_rebuilds_from_the_file_alone(tmp_path: Path, overrides, sie):
    cfg = _cfg(*overrides)
    model = _trained_looking_model(cfg)
    path = atomic_save(build_final_checkpoint(model, cfg, num_classes=7, num_cameras=3), tmp_path / "model_final.pth")
    loaded, loaded_cfg, report = load_finetuned_model(path)
    assert report is None and loaded_cfg == cfg
    torch.testing.assert_close(_features(loaded, sie), _features(model, sie), rtol=0, atol=0)
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta["num_classes"] == 7 and meta["sie"] is sie and meta["jpm"] is sie
    assert meta["feature_dim"] == model.feature_dim and meta["img_size"] == [64, 32]
    assert stored_config(path)["model"]["arch"] == "vit_tiny"


def test_model_final_with_a_tampered_state_is_refused(tmp_path: Path):
    cfg = _cfg()
    final = build_final_checkpoint(_trained_looking_model(cfg), cfg, 7, 3)
    del final["model"]["head.necks.1.weight"]
    final["model"]["stray"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match=r"missing \['head.necks.1.weight'\].*unexpected \['stray'\]"):
        load_finetuned_model(final)


def _imagenet_fc(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The unused ImageNet classifier (1000 classes) of the TransReID ViT, which every released state dict holds."""
    dim = model.backbone.embed_dim
    return {f"{prefix}base.fc.weight": torch.randn(1000, dim), f"{prefix}base.fc.bias": torch.randn(1000)}


def _published_pass(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model in PASS-reID's names (build_transformer_pass): base.* (with the backbone's ImageNet fc),
    bottleneck[_k], classifier."""
    out = _imagenet_fc(model, "module.")
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            out["module.base." + key[len("backbone."):]] = value.clone()
        elif key.startswith("head.necks."):
            index, rest = key[len("head.necks."):].split(".", 1)
            out["module." + ("bottleneck" if index == "0" else f"bottleneck_{index}") + "." + rest] = value.clone()
        elif key.startswith("head.classifier."):
            out["module.classifier." + key[len("head.classifier."):]] = value.clone()
        else:
            raise AssertionError(f"unexpected key {key}")
    return out


def _published_transreid_jpm(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model in TransReID's names (build_transformer_local, SIE): [CLS] slot inside base.pos_embed,
    b1 = global copy of the last block + LN, b2 = local copy, base's own last block/LN unused."""
    state = model.state_dict()
    depth = model.backbone.depth
    out = {"base.sie_embed": state["sie_embed"].clone(),
           "base.pos_embed": torch.cat([state["backbone.cls_pos"], state["backbone.pos_embed"]], dim=1),
           **_imagenet_fc(model)}
    for key, value in state.items():
        if key.startswith(f"backbone.blocks.{depth - 1}."):
            out["b1.0." + key.split(".", 3)[3]] = value.clone()
            out["base.blocks." + key.split(".", 2)[2]] = torch.randn_like(value)  # stale, unused by JPM
        elif key.startswith("backbone.norm."):
            out["b1.1." + key[len("backbone.norm."):]] = value.clone()
            out["base.norm." + key[len("backbone.norm."):]] = torch.randn_like(value)
        elif key in ("backbone.cls_pos", "backbone.pos_embed", "sie_embed"):
            continue
        elif key.startswith("backbone."):
            out["base." + key[len("backbone."):]] = value.clone()
        elif key.startswith("jpm.block."):
            out["b2.0." + key[len("jpm.block."):]] = value.clone()
        elif key.startswith("jpm.norm."):
            out["b2.1." + key[len("jpm.norm."):]] = value.clone()
        elif key.startswith("jpm.heads."):
            index, kind, rest = key[len("jpm.heads."):].split(".", 2)
            name = "bottleneck" if kind == "necks" else "classifier"
            rest = rest.split(".", 1)[1] if kind == "necks" else rest
            out[f"{name}_{int(index) + 1}.{rest}"] = value.clone()
        elif key.startswith("head.necks.0."):
            out["bottleneck." + key[len("head.necks.0."):]] = value.clone()
        elif key.startswith("head.classifier."):
            out["classifier." + key[len("head.classifier."):]] = value.clone()
        else:
            raise AssertionError(f"unexpected key {key}")
    return out


def test_pre_training_files_are_named_as_such(tmp_path: Path):
    # A pre-training checkpoint also stores a config and an iteration; it must not be read as a fine-tuning run.
    vit = tiny_pass_vit()
    files = {"a pre-training checkpoint": save_published_pass_checkpoint(tmp_path / "pass.pth", vit),
             "a backbone export": save_backbone_export(tmp_path / "backbone_final.pth", vit)}
    torch.save({"model": {"student.backbone.cls_token": torch.zeros(1)}, "config": {"crops": {}}, "iteration": 5},
               tmp_path / "checkpoint.pth")  # the layout of a passreid pre-training run's checkpoint
    files["a pre-training checkpoint "] = tmp_path / "checkpoint.pth"
    for what, path in files.items():
        message = f"{path} is {what.strip()}, which holds no re-ID head: fine-tune from it first"
        with pytest.raises(CheckpointFormatError, match=re.escape(message)):
            stored_config(path)
        with pytest.raises(CheckpointFormatError, match=re.escape(message)):
            load_finetuned_model(path, _cfg())


def test_published_pass_checkpoint_maps_exactly(tmp_path: Path):
    cfg = _cfg()
    model = _trained_looking_model(cfg)
    path = tmp_path / "transformer_120.pth"
    torch.save(_published_pass(model), path)
    loaded, _, report = load_finetuned_model(path, cfg)
    assert report.is_exact and len(report.loaded) == report.num_model_tensors
    assert [d.split(" ")[0] for d in report.dropped] == ["base.fc.weight", "base.fc.bias"]
    torch.testing.assert_close(_features(loaded, False), _features(model, False), rtol=0, atol=0)


def test_finetune_test_py_evaluates_a_released_checkpoint_without_extra_flags(tmp_path: Path, synthetic_world):
    """finetune/test.py --config-file <recipe> --weights <released TransReID file with base.fc.*>: evaluated, and the
    dropped keys are named in the log and in metrics.json."""
    overrides = ["model.head=cls", "model.num_part_tokens=0", f"data.root={synthetic_world}/market"]
    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo.yaml", overrides)
    torch.manual_seed(0)
    path = save_published_transreid_checkpoint(tmp_path / "transformer_120.pth",
                                               build_model(cfg, 7, 0, load_weights=False))
    test_py = load_tool_module(REPO / "finetune" / "test.py", "finetune_test_entry")
    out = tmp_path / "test"
    with restored_passreid_logging():
        assert test_py.main(["--config-file", str(REPO / "configs" / "finetune" / "demo.yaml"), "--weights",
                             str(path), "--output-dir", str(out), *overrides]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["mAP"] <= 1.0
    for text in (metrics["published_checkpoint_report"], (out / "log.txt").read_text()):
        assert "base.fc.weight (the ViT's ImageNet classifier, unused by the re-ID forward)" in text
        assert "base.fc.bias" in text


def test_published_transreid_jpm_sie_checkpoint_maps_and_reports_unused_base_keys():
    cfg = _cfg(*JPM_SIE)
    model = _trained_looking_model(cfg)
    loaded, _, report = load_finetuned_model({"state_dict": _published_transreid_jpm(model)}, cfg)
    assert report.is_exact
    assert any(d.startswith("base.blocks.3.attn.qkv.weight (unused") for d in report.dropped)
    assert any(d.startswith("base.norm.weight (unused") for d in report.dropped)
    torch.testing.assert_close(_features(loaded, True), _features(model, True), rtol=0, atol=0)


def test_published_checkpoint_mismatches_are_reported_never_silent():
    cfg = _cfg()
    published = _published_pass(_trained_looking_model(cfg))
    published["module.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match=r"extra_head.weight \(no mapping rule\)"):
        load_finetuned_model(published, cfg)
    _, _, report = load_finetuned_model(published, cfg, allow_unexpected=["extra_head.*"])
    assert report.unexpected == ["extra_head.weight (no mapping rule)"]

    del published["module.bottleneck_2.running_mean"]
    with pytest.raises(CheckpointMismatchError, match="head.necks.2.running_mean"):
        load_finetuned_model(published, cfg, allow_unexpected=["extra_head.*"])
    with pytest.raises(CheckpointMismatchError, match="JPM=False, SIE=False but the config says model.jpm=True"):
        load_finetuned_model(published, _cfg(*JPM_SIE))
    with pytest.raises(CheckpointFormatError, match="pass the config"):
        load_finetuned_model(published)


# ------------------------------------------------------------------ DPM, TSD, DPEFormer, BPBReID released layouts
# Same weights, same inputs, same process: the features agree up to the order of threaded float reductions.
FEATURE_TOL = dict(rtol=0, atol=1e-6)


def _demo(name: str, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, REPO / "configs" / "finetune" / f"demo_{name}.yaml",
                       ["model.drop_path_rate=0.0", *overrides])


def _eval_rows(model: torch.nn.Module) -> torch.Tensor:
    images = torch.randn(4, 3, 128, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(images)


@pytest.mark.parametrize("method,released,dropped", [
    ("dpm", dpm_released_state, ["base.fc.weight"]),
    ("tsd", tsd_released_state, ["base.fc.weight", "base.blocks.3.attn.qkv.weight", "base.norm.weight",
                                 "part_decoder.post_norm.weight"]),
    ("dpeformer", dpeformer_released_state, ["base.fc.weight", "b2.0.0.attn.qkv.weight", "REM_zx.1.conv_query.weight",
                                             "classifier_local.0.weight", "classifier1_3.weight",
                                             "attention_global.2.param", "attention_global.2.Block.attn.param",
                                             "ffn3.layers2.fn.net.0.weight", "bottleneck_local.9.running_mean"]),
])
def test_released_occluded_method_checkpoints_load_exactly(tmp_path: Path, caplog, method, released, dropped):
    overrides = ["dpeformer.global_token=first_patch"] if method == "dpeformer" else []
    cfg = _demo(method, *overrides)
    model = _trained_looking_model(cfg, num_cameras=0)
    state = released(model)
    path = tmp_path / "transformer_120.pth"
    torch.save(state, path)
    assert published_layout(state).method == method
    with caplog.at_level(logging.INFO, logger="passreid.finetune.checkpoints"):
        loaded, _, report = load_finetuned_model(path, cfg)
    reported = [entry.split(" ")[0] for entry in report.dropped]
    assert set(dropped) <= set(reported) and all(name in caplog.text for name in dropped)
    expected = {k: v for k, v in model.state_dict().items() if k != "memory.features"}
    assert report.missing == (["memory.features"] if method == "dpeformer" else [])
    assert not report.unexpected and not report.shape_mismatched
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    torch.testing.assert_close(_eval_rows(loaded), _eval_rows(model), **FEATURE_TOL)


def test_released_checkpoint_needs_a_config_of_its_method(tmp_path: Path):
    dpm = dpm_released_state(_trained_looking_model(_demo("dpm"), num_cameras=0))
    with pytest.raises(CheckpointMismatchError, match=r"released DPM checkpoint .*loads into method: dpm, but the "
                                                      r"config's method is 'bnneck'.*dpm_vit_b_256.yaml"):
        load_finetuned_model(dpm, _demo("occluded"))
    with pytest.raises(CheckpointFormatError, match=r"not a passreid fine-tuned model \(it is a released DPM"):
        load_finetuned_model(dpm)
    dpm["base.attfc.weight"] = dpm["base.attfc.weight"][:, :5]
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch mask_generator.fc.weight: checkpoint \[192, 5\]"):
        load_finetuned_model(dpm, _demo("dpm"))


def test_released_dpeformer_with_the_paper_global_token_warns(caplog):
    cfg = _demo("dpeformer")
    assert cfg.dpeformer.global_token == "cls"
    with caplog.at_level(logging.WARNING, logger="passreid.finetune.checkpoints"):
        load_finetuned_model(dpeformer_released_state(_trained_looking_model(cfg, num_cameras=0)), cfg)
    assert "dpeformer.global_token=first_patch" in caplog.text


# BPBReID on HRNet-W32 (ResNet-50 below) at 64x32: the backbone is full size, the inputs tiny (fast on the CPU).
HRNET_64 = ("model.arch=hrnet_w32", "model.img_size=[64,32]")
BPBREID_DROPPED = ["backbone_appearance_feature_extractor.cls_head.0.weight",
                   "background_after_pooling_dim_reduce.layers.0.weight",
                   "background_identity_classifier.classifier.weight"]


@pytest.fixture(scope="module")
def bpbreid_hrnet() -> tuple[FinetuneConfig, torch.nn.Module]:
    cfg = _demo("bpbreid", *HRNET_64)
    return cfg, _trained_looking_model(cfg, num_cameras=0)


def _save_released_bpbreid(path: Path, model: torch.nn.Module, **bpbreid_settings) -> Path:
    """torchreid's checkpoint of ``model`` with its yacs config; saved with a stand-in yacs, read without one."""
    with yacs_config() as node:
        torch.save(bpbreid_released_checkpoint(model, torchreid_config(node, **bpbreid_settings)), path)
    assert "yacs" not in sys.modules
    return path


def test_released_bpbreid_checkpoint_loads_exactly(tmp_path: Path, caplog, bpbreid_hrnet):
    cfg, model = bpbreid_hrnet
    path = _save_released_bpbreid(tmp_path / "bpbreid_market1501_hrnet32.pth", model,
                                  testing_binary_visibility_score=False)
    with caplog.at_level(logging.INFO, logger="passreid.finetune.checkpoints"):
        loaded, _, report = load_finetuned_model(path, cfg)
    assert report.is_exact and len(report.loaded) == report.num_model_tensors
    assert set(BPBREID_DROPPED) <= {entry.split(" ")[0] for entry in report.dropped}
    assert all(name in caplog.text for name in BPBREID_DROPPED)
    assert "background_identity_classifier.classifier.weight (the background embedding: no GiLt loss term" in caplog.text
    loaded_state = loaded.state_dict()
    assert all(torch.equal(loaded_state[k], v) for k, v in model.state_dict().items())
    images = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), model.eval()(images), **FEATURE_TOL)
    # The stored torchreid config tests with continuous visibility; the passreid config says binary: warned.
    assert "model.bpbreid.testing_binary_visibility_score=False (passreid: True)" in caplog.text


def test_released_bpbreid_resnet50_state_maps_onto_the_model():
    cfg = _demo("bpbreid", "model.arch=resnet50", "model.img_size=[64,32]")
    torch.manual_seed(0)
    model = build_model(cfg, 7, 0, load_weights=False)
    released = bpbreid_released_state(model)
    layout = published_layout(released)
    assert layout is PUBLISHED_LAYOUTS[0] and layout.method == "bpbreid"
    mapped, dropped, unknown = map_published_state_dict(released, 0, False, layout)
    assert not unknown and mapped.keys() == model.state_dict().keys()
    assert all(torch.equal(mapped[k], v) for k, v in model.state_dict().items())
    assert "backbone_appearance_feature_extractor.classifier.weight (the ResNet's own identity classifier, unused by " \
           "BPBReID's forward)" in dropped


def _tiny_market(root: Path) -> Path:
    """A Market-1501 folder of 3 train, 3 query and 6 gallery images (noise): HRNet-W32 evaluates it in seconds."""
    generator = torch.Generator().manual_seed(0)
    names = {"bounding_box_train": ["0001_c1s1_000001_00.jpg", "0001_c2s1_000002_00.jpg", "0002_c1s1_000003_00.jpg"],
             "query": [f"000{pid}_c1s1_00001{pid}_00.jpg" for pid in (3, 4, 5)],
             "bounding_box_test": [f"000{pid}_c{cam}s1_00002{pid}_00.jpg" for pid in (3, 4, 5) for cam in (2, 3)]}
    for split, files in names.items():
        (root / split).mkdir(parents=True)
        for name in files:
            pixels = torch.randint(0, 256, (64, 32, 3), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / split / name)
    return root


def test_finetune_test_py_evaluates_a_released_bpbreid_checkpoint(tmp_path: Path, bpbreid_hrnet):
    """finetune/test.py --config-file demo_bpbreid.yaml (HRNet-W32) --weights <torchreid file>: no extra flags."""
    path = _save_released_bpbreid(tmp_path / "bpbreid.pth", bpbreid_hrnet[1])
    test_py = load_tool_module(REPO / "finetune" / "test.py", "finetune_test_entry")
    out = tmp_path / "test"
    with restored_passreid_logging():
        assert test_py.main(["--config-file", str(REPO / "configs" / "finetune" / "demo_bpbreid.yaml"), "--weights",
                             str(path), "--output-dir", str(out), *HRNET_64, "model.drop_path_rate=0.0",
                             f"data.root={_tiny_market(tmp_path / 'market1501')}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["mAP"] <= 1.0 and metrics["feature_dim"] == 6 * (512 + 1)  # [bn_foreground, 5 parts] + visibility
    for text in (metrics["published_checkpoint_report"], (out / "log.txt").read_text()):
        assert "backbone_appearance_feature_extractor.cls_head.0.weight (HRNet's 1x1 reduction" in text
    assert "released run's config" not in (out / "log.txt").read_text()  # the published test settings: no warning


def _without(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def test_released_bpbreid_checkpoint_that_does_not_fit_names_the_setting(bpbreid_hrnet):
    cfg, model = bpbreid_hrnet
    state = bpbreid_released_state(model)
    hrnet = ["model.arch=hrnet_w32", "model.img_size=[64,32]"]
    with pytest.raises(CheckpointFormatError, match=r"released BPBReID \(torchreid\) checkpoint.*--config-file, e\.g\. "
                                                    r"configs/finetune/market1501/bpbreid_hrnet32_384\.yaml"):
        load_finetuned_model(state)
    refusals = [
        (state, _demo("bpbreid"), r"trained on a HRNet-W32 backbone but the config's model.arch is 'vit_tiny'; "
                                  r"set model.arch=hrnet_w32"),
        (state, _demo("bpbreid", *hrnet, "data.mask_preprocess=eight"),
         r"trained with 5 body parts .* data.mask_preprocess=eight has 8; .* grouping of 5 parts \(five_v, five;"),
        (state, _demo("bpbreid", *hrnet, "bpbreid.dim_reduce=256"), r"set bpbreid.dim_reduce=512"),
        (_without(state, "global_after_pooling_dim_reduce."), cfg,
         r"holds no after-pooling reduction .*dim_reduce other than after_pooling"),
        ({**state, "before_pooling_dim_reduce.layers.0.weight": torch.zeros(512, 1920, 1, 1)}, cfg,
         r"holds a before-pooling reduction \(before_pooling_dim_reduce"),
        ({**_without(state, "parts_identity_classifier."), "parts_identity_classifier.bn.weight": torch.ones(512),
          "parts_identity_classifier.classifier.weight": torch.zeros(7, 512)}, cfg,
         r"shared_parts_id_classifier=True .* --allow-missing 'parts_classifiers\.\*'"),
        ({**_without(state, "backbone_appearance_feature_extractor."),
          "backbone_appearance_feature_extractor.layer4.0.bn1.IN.weight": torch.ones(256)}, cfg,
         r"with a ResNet-IBN \(IBN-Net; timm has none\) backbone; passreid builds HRNet-W32 .* and ResNet-50"),
    ]
    for released, config, message in refusals:
        with pytest.raises(CheckpointMismatchError, match=message):
            load_finetuned_model(released, config)