"""passreid.FeatureExtractor / load_model: same features as the evaluation pipeline, every weights layout,
every input type, clear errors; torch.hub entries."""
from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from _inference_models import (REPO, demo_config, save_backbone_export, save_published_pass_checkpoint,
                               save_published_transreid_checkpoint, tiny_pass_vit, train_demo_model)
from _released_checkpoints import (bpbreid_released_checkpoint, dpeformer_released_state, dpm_released_state,
                                   torchreid_config, tsd_released_state, yacs_config)
from PIL import Image
from torch.utils.data import DataLoader

from passreid.config import load_config
from passreid.data import build_dataset
from passreid.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from passreid.data.samplers import ImageDataset
from passreid.data.transforms import build_test_transform
from passreid.eval.evaluator import extract_split
from passreid.eval.features import cls_feature, extract_features, pass_fusion_feature
from passreid.finetune import FinetuneConfig, FinetuneMethod, build_model, get_method, list_methods, register_method
from passreid.finetune.methods import build_bnneck_model, build_reid_criterion
from passreid.inference import (FeatureExtractor, WeightsKindError, extracted, identify_weights, list_images,
                                load_model, parse_market_names)
from passreid.models import CheckpointFormatError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory, synthetic_world):
    weights, cfg = train_demo_model(tmp_path_factory.mktemp("inference") / "demo", synthetic_world)
    return weights, cfg


@pytest.fixture(scope="module")
def market(synthetic_world):
    return build_dataset("market1501", synthetic_world / "market")


def _reference_backbone_features(vit, items, feature_fn):
    """What the pre-training kNN monitor computes: test transform with ImageNet statistics."""
    transform = build_test_transform((128, 64), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    loader = DataLoader(ImageDataset(items, transform), batch_size=16)
    return extract_features(vit, loader, feature_fn=feature_fn, device="cpu").feats


def test_extractor_gives_the_test_pipeline_features(demo_model, market):
    weights, _ = demo_model
    extractor = FeatureExtractor(weights, device="cpu", batch_size=16)
    model = extractor.model
    assert model.kind == "finetuned" and model.method == "bnneck"
    reference = extract_split(model.network, market.query, model.img_size, model.config, torch.device("cpu"))
    feats = extractor([item.path for item in market.query])
    assert feats.shape == reference.feats.shape and feats.dtype == torch.float32
    np.testing.assert_allclose(feats.numpy(), reference.feats, atol=1e-5, rtol=0)
    # A folder and a glob list the same images in the same (sorted) order as the reader.
    folder = extractor(str(market.root) + "/query")
    np.testing.assert_allclose(folder.numpy(), reference.feats, atol=1e-5, rtol=0)
    assert list_images(str(market.root) + "/query/*.jpg") == [item.path for item in market.query]


def test_pil_numpy_and_tensor_inputs_match_paths(demo_model, market):
    extractor = FeatureExtractor(demo_model[0], device="cpu")
    paths = [item.path for item in market.query[:4]]
    from_paths = extractor(paths)
    pil_images = [Image.open(p).convert("RGB") for p in paths]
    arrays = [np.array(image) for image in pil_images]
    tensors = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])
    assert arrays[0].shape == (128, 64, 3)  # already the model's size: every path is exact
    np.testing.assert_allclose(extractor(pil_images).numpy(), from_paths.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(extractor(np.stack(arrays)).numpy(), from_paths.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(extractor(tensors).numpy(), from_paths.numpy(), atol=1e-5, rtol=0)
    mixed = extractor([paths[0], pil_images[1], arrays[2], tensors[3]])
    np.testing.assert_allclose(mixed.numpy(), from_paths.numpy(), atol=1e-5, rtol=0)
    # Another input size is resized to the model's: close to (not exactly) what PIL's resize gives.
    big = [image.resize((128, 256), Image.BILINEAR) for image in pil_images]
    assert extractor(big).shape == from_paths.shape
    with pytest.raises(TypeError, match="unsupported image input"):
        extractor([3.5])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        extractor(torch.zeros(5, 2, 2))


def test_backbone_export_gives_the_pass_fusion_feature(tmp_path, market):
    vit = tiny_pass_vit()
    path = save_backbone_export(tmp_path / "backbone_final.pth", vit)
    extractor = FeatureExtractor(path, device="cpu")
    assert extractor.model.kind == "backbone_export" and extractor.model.config is None
    items = market.query[:6]
    expected = _reference_backbone_features(vit, items, pass_fusion_feature)
    assert expected.shape[1] == 2 * 192
    np.testing.assert_allclose(extractor([i.path for i in items]).numpy(), expected, atol=1e-5, rtol=0)
    cls_only = FeatureExtractor(path, device="cpu", backbone_feature="cls")
    np.testing.assert_allclose(cls_only([i.path for i in items]).numpy(),
                               _reference_backbone_features(vit, items, cls_feature), atol=1e-5, rtol=0)


def test_published_pass_and_dino_pretraining_checkpoints(tmp_path, market):
    vit = tiny_pass_vit(seed=1)
    path = save_published_pass_checkpoint(tmp_path / "checkpoint.pth", vit)
    model = load_model(path, device="cpu")
    assert model.kind == "pretrain_checkpoint" and model.img_size == (128, 64)
    assert model.backbone.num_part_tokens == 3
    for key, value in vit.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    # DINO: no part tokens, pos_embed with the [CLS] slot, input size inferred from the grid (hw_ratio 2).
    dino = tiny_pass_vit(seed=2, num_part_tokens=0)
    state = {k: v for k, v in dino.state_dict().items() if k != "cls_pos"}
    state["pos_embed"] = torch.cat([dino.cls_pos.detach(), dino.pos_embed.detach()], dim=1)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}, "student": {}}, tmp_path / "dino.pth")
    extractor = FeatureExtractor(tmp_path / "dino.pth", device="cpu")
    assert extractor.model.kind == "pretrain_checkpoint" and extractor.model.img_size == (128, 64)
    items = market.query[:3]
    np.testing.assert_allclose(extractor([i.path for i in items]).numpy(),
                               _reference_backbone_features(dino, items, cls_feature), atol=1e-5, rtol=0)


def test_published_transreid_checkpoint_needs_and_uses_its_config(tmp_path, synthetic_world, market):
    cfg = demo_config(tmp_path / "run", synthetic_world, "model.head=cls", "model.num_part_tokens=0")
    torch.manual_seed(0)
    original = build_model(cfg, 7, 0, load_weights=False).eval()
    path = save_published_transreid_checkpoint(tmp_path / "transreid.pth", original)
    with pytest.raises(WeightsKindError, match="config"):
        load_model(path, device="cpu")
    model = load_model(path, cfg, device="cpu")
    assert model.kind == "published_finetuned" and model.report is not None and model.report.is_exact
    images = model.prepare([i.path for i in market.query[:3]])
    with torch.no_grad():
        np.testing.assert_allclose(model.features(images).numpy(), original(images).numpy(), atol=1e-5, rtol=0)


def test_files_of_the_wrong_kind_fail_clearly(tmp_path, demo_model, caplog):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "missing.pth")
    with pytest.raises(WeightsKindError, match="folder"):
        load_model(tmp_path)
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(CheckpointFormatError, match="notes.txt is not a PyTorch checkpoint: it starts with the text "
                                                    "'hello'.*expected a PyTorch checkpoint written by torch.save"):
        load_model(tmp_path / "notes.txt")
    torch.save({"optimizer": {"state": {}}, "epoch": 3}, tmp_path / "optimizer.pth")
    with pytest.raises(WeightsKindError, match="optimizer.pth is not a model file.*optimizer.*expected one of.*"
                                                "model_final"):
        load_model(tmp_path / "optimizer.pth")
    with pytest.raises(WeightsKindError, match="holds a list, not a checkpoint dict"):
        identify_weights([1, 2])
    assert identify_weights(torch.load(demo_model[0], weights_only=True)) == "finetuned"
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="pattern"):
        list_images(str(tmp_path / "*.jpg"))
    Image.new("RGB", (8, 16)).save(tmp_path / "person.jpg")
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.WARNING, logger="passreid.inference"):
        assert list_images(tmp_path) == [str(tmp_path / "person.jpg")]
    assert "ignored 3 entries without an image extension" in caplog.text  # never left out silently
    assert "notes.txt" in caplog.text and "optimizer.pth" in caplog.text and "sub" in caplog.text


@pytest.mark.parametrize("method,released", [("dpm", dpm_released_state), ("tsd", tsd_released_state),
                                             ("dpeformer", dpeformer_released_state)])
def test_released_occluded_method_checkpoints_are_recognised(tmp_path, method, released):
    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / f"demo_{method}.yaml")
    torch.manual_seed(0)
    original = build_model(cfg, 7, 0, load_weights=False).eval()
    torch.save(released(original), tmp_path / "released.pth")
    assert identify_weights(torch.load(tmp_path / "released.pth", weights_only=True)) == "published_finetuned"
    with pytest.raises(WeightsKindError, match="pass the fine-tuning config"):
        load_model(tmp_path / "released.pth", device="cpu")
    model = load_model(tmp_path / "released.pth", cfg, device="cpu")
    assert model.kind == "published_finetuned" and model.method == method
    images = torch.randn(2, 3, 128, 64, generator=torch.Generator().manual_seed(0))
    # Same weights and inputs: equal up to the order of threaded float reductions.
    torch.testing.assert_close(model.features(images), original(images), rtol=0, atol=1e-6)


def test_released_bpbreid_checkpoint_loads_with_its_config(tmp_path):
    """A torchreid BPBReID file (HRNet-W32; its yacs config pickled alongside) loads through load_model, no yacs."""
    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo_bpbreid.yaml",
                      ["model.arch=hrnet_w32", "model.img_size=[64,32]"])
    torch.manual_seed(0)
    original = build_model(cfg, 7, 0, load_weights=False).eval()
    with yacs_config() as node:
        torch.save(bpbreid_released_checkpoint(original, torchreid_config(node)), tmp_path / "bpbreid.pth")
    with pytest.raises(WeightsKindError, match="bpbreid.pth is a released fine-tuned checkpoint .* pass the "
                                                "fine-tuning config"):
        load_model(tmp_path / "bpbreid.pth", device="cpu")
    model = load_model(tmp_path / "bpbreid.pth", cfg, device="cpu")
    assert model.kind == "published_finetuned" and model.method == "bpbreid"
    images = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    # Same weights and inputs: equal up to the order of threaded float reductions.
    with torch.no_grad():
        torch.testing.assert_close(model.features(images), original(images), rtol=0, atol=1e-6)


def test_market_names_parse_to_pids_and_zero_based_cameras():
    pids, camids = parse_market_names(["/a/0002_c4s1_001474_01.jpg", "-1_c1s1_0.jpg", "0000_c6_f1.jpg"])
    assert pids.tolist() == [2, -1, 0] and camids.tolist() == [3, 0, 5]
    assert parse_market_names(["0002_c4.jpg", "holiday.jpg"]) is None


def test_test_distance_uses_the_methods_own_distance(demo_model):
    name = "test_inference_reversed_distance"
    if name not in list_methods():
        def reversed_distance(cfg, query, gallery, device):
            return lambda start, end: -torch.from_numpy(query.feats[start:end] @ gallery.feats.T)
        register_method(FinetuneMethod(name, "test only", build_bnneck_model, build_reid_criterion,
                                       build_test_distance=reversed_distance))
    model = load_model(demo_model[0], device="cpu")
    feats = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    plain = model.test_distance(extracted(feats[:2]), extracted(feats), "cpu")(0, 2)
    expected = 2 - 2 * (feats[:2] / np.linalg.norm(feats[:2], axis=1, keepdims=True)) @ \
        (feats / np.linalg.norm(feats, axis=1, keepdims=True)).T
    np.testing.assert_allclose(plain.numpy(), expected, atol=1e-5)
    model.config = dataclasses.replace(model.config, method=name)
    assert get_method(name).build_test_distance is not None
    custom = model.test_distance(extracted(feats[:2]), extracted(feats), "cpu")(0, 2)
    np.testing.assert_allclose(custom.numpy(), -(feats[:2] @ feats.T), atol=1e-5)


def test_import_passreid_is_light_and_exports_lazily():
    code = ("import sys, passreid; assert 'torch' not in sys.modules, 'torch imported'; "
            "from passreid import FeatureExtractor, load_model; import passreid.inference as m; "
            "assert FeatureExtractor is m.FeatureExtractor and load_model is m.load_model; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_torch_hub_entries_load_local_weights(tmp_path, demo_model, market):
    extractor = torch.hub.load(str(REPO), "feature_extractor", source="local", weights=str(demo_model[0]),
                               device="cpu", trust_repo=True)
    paths = [i.path for i in market.query[:2]]
    net = torch.hub.load(str(REPO), "passreid_model", source="local", weights=str(demo_model[0]), device="cpu",
                         trust_repo=True)
    images = extractor.model.prepare(paths)
    with torch.no_grad():
        np.testing.assert_allclose(net(images).numpy(), extractor(paths).numpy(), atol=1e-5, rtol=0)
    assert net.img_size == (128, 64)
    backbone = save_backbone_export(tmp_path / "backbone.pth", tiny_pass_vit())
    with pytest.raises(WeightsKindError, match="vit_small"):
        torch.hub.load(str(REPO), "pass_vit_small", source="local", weights=str(backbone), trust_repo=True)
    with pytest.raises(WeightsKindError, match="fine-tuned"):
        torch.hub.load(str(REPO), "pass_vit_small", source="local", weights=str(demo_model[0]), trust_repo=True)
