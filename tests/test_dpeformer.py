"""DPEFormer: shapes, DPSM selection, FBM, memory, published loss terms and weights, two views, short training."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from passreid.config import ConfigError, load_config
from passreid.finetune import FinetuneConfig, build_criterion, get_method, run_training
from passreid.finetune.dpeformer import (ClassCentroidMemory, DPEFormerModel, FeatureBlendingModule, TwoViewDataset,
                                         build_two_view_train_set, dynamic_patch_selection, merge_heads,
                                         selection_sizes)
from passreid.models.factory import build_backbone

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, CONFIGS / "demo_dpeformer.yaml", list(overrides))


def _model(cfg: FinetuneConfig, num_classes: int = 7) -> DPEFormerModel:
    d = cfg.dpeformer
    return DPEFormerModel(build_backbone(cfg.model), num_classes, d.global_token, d.num_parts, d.min_selected,
                          fbm_head_merge=d.fbm_head_merge)


def test_shapes_and_heads():
    torch.manual_seed(0)
    model = _model(_cfg()).train()
    images = torch.randn(8, 3, 128, 64)
    out = model(images, view2=images.flip(-1))
    assert [t.shape for t in out.concat_logits] == [(8, 7)] * 4 and [t.shape for t in out.global_logits] == [(8, 7)] * 2
    assert len(out.part_logits) == 8 and all(t.shape == (8, 7) for t in out.part_logits)
    assert [t.shape for t in out.stripes] == [(8, 768)] * 2                  # 4 stripes x 192
    assert model.memory.features.shape == (7, 768)
    assert model.global_classifier.weight.shape == (7, 192) and model.global_classifier.bias is None
    assert model.eval()(images).shape == (8, model.feature_dim) == (8, 768)  # test feature: enriched parts
    with pytest.raises(ValueError, match="view2"):
        model.train()(images)


def test_global_token_switch():
    images = torch.randn(2, 3, 128, 64)
    for choice, pick in (("cls", lambda t, lead: t[:, 0]), ("first_patch", lambda t, lead: t[:, lead])):
        model = _model(_cfg(f"dpeformer.global_token={choice}")).eval()
        tokens = model.backbone.forward_tokens(images)
        g, patches = model.tokens(images)
        lead = model.backbone.num_leading_tokens()
        torch.testing.assert_close(g, pick(tokens, lead))
        torch.testing.assert_close(patches, tokens[:, lead:])


def test_dpsm_selection_matches_a_hand_computed_example():
    # 6 patch tokens in 2-D; g points along x: anchor = token 0 (largest <g, t>).
    patches = torch.tensor([[[3.0, 0.0], [2.9, 0.1], [2.8, 0.0], [0.0, 1.0], [0.1, 1.0], [2.0, 0.0]]])
    g = torch.tensor([[1.0, 0.0]])
    # <t_0, t_n> = 9, 8.7, 8.4, 0, 0.3, 6 -> sorted 9, 8.7, 8.4, 6, 0.3, 0 -> differences .3 .3 2.4 5.7 .3 0
    # -> k = argmax = 3 (0-based position of the largest drop): the top 3 tokens 0, 1, 2.
    order, sizes = selection_sizes(g, patches, min_selected=2)
    assert order[0].tolist() == [0, 1, 2, 5, 4, 3] and sizes.tolist() == [3]
    assert selection_sizes(g, patches, min_selected=4)[1].tolist() == [4]  # the clip to >= min_selected
    parts = dynamic_patch_selection(g, patches, min_selected=3, num_parts=3)
    torch.testing.assert_close(parts[0], patches[0, [0, 1, 2]])           # 3 tokens -> 3 parts, in order
    two = dynamic_patch_selection(g, patches, min_selected=4, num_parts=2)
    torch.testing.assert_close(two[0], torch.stack([patches[0, [0, 1]].mean(0), patches[0, [2, 5]].mean(0)]))


def test_dpsm_pools_every_image_to_the_batch_minimum():
    torch.manual_seed(1)
    patches, g = torch.randn(3, 32, 8), torch.randn(3, 8)
    _, sizes = selection_sizes(g, patches, 6)
    order, _ = selection_sizes(g, patches, 6)
    common = int(sizes.min())
    parts = dynamic_patch_selection(g, patches, 6, 4)
    for b in range(3):
        chosen = patches[b, order[b, : int(sizes[b])]].t().unsqueeze(0)
        expected = F.adaptive_avg_pool1d(F.adaptive_avg_pool1d(chosen, common), 4)[0].t()
        torch.testing.assert_close(parts[b], expected)
    with pytest.raises(ValueError, match="min_selected"):
        dynamic_patch_selection(g, patches, 40, 4)


def test_fbm_reads_vectors_as_16_dim_tokens_and_is_residual():
    torch.manual_seed(2)
    fbm = FeatureBlendingModule(192, token_dim=16, num_heads=2, mlp_ratio=1.0)
    assert fbm.num_tokens == 12 and fbm.pos_embed.shape == (1, 12, 16) and float(fbm.pos_embed.detach().abs().sum()) == 0
    assert fbm.q.bias is None and fbm.kv.bias is None
    part, g = torch.randn(4, 192), torch.randn(4, 192)
    assert fbm(part, g).shape == (4, 192)
    for module in (fbm.proj, fbm.mlp[2]):                                 # zero both residual branches
        torch.nn.init.zeros_(module.weight)
        torch.nn.init.zeros_(module.bias)
    torch.testing.assert_close(fbm(part, g), part)


def test_head_merge_layouts_equal_an_index_by_index_reference():
    batch, heads, length, dim = 4, 2, 3, 5
    out = torch.randn(batch, heads, length, dim)
    per_image = torch.empty(batch, length, heads * dim)
    for b in range(batch):
        for t in range(length):
            per_image[b, t] = torch.cat([out[b, h, t] for h in range(heads)])
    torch.testing.assert_close(merge_heads(out, "per_image"), per_image, rtol=0, atol=0)
    # Released code: the (1, B, H, T, d) result is transposed to (1, H, B, T, d) and read as (B, T, H*d), i.e.
    # the buffer in (h, b, t, d) order, reshaped.
    buffer = [float(out[b, h, t, d]) for h in range(heads) for b in range(batch) for t in range(length)
              for d in range(dim)]
    released = torch.tensor(buffer).reshape(batch, length, heads * dim)
    torch.testing.assert_close(merge_heads(out, "released_batch_mix"), released, rtol=0, atol=0)
    # Image 0 gets head 0 of images 0 and 1; image 2 (>= B/2) head 1 of images 0 and 1.
    torch.testing.assert_close(released[0].reshape(-1), torch.cat([out[0, 0].reshape(-1), out[1, 0].reshape(-1)]))
    torch.testing.assert_close(released[2].reshape(-1), torch.cat([out[0, 1].reshape(-1), out[1, 1].reshape(-1)]))
    with pytest.raises(ValueError, match="fbm_head_merge"):
        merge_heads(out, "released")


@pytest.mark.parametrize("head_merge", ["per_image", "released_batch_mix"])
def test_only_the_released_head_merge_makes_a_feature_depend_on_its_batch_neighbours(head_merge):
    # min_selected = all 32 patches of the 8x4 grid: every image keeps all its patches, so DPSM's pooling to the
    # batch's smallest selection is per image and the FBM head merge is the only thing that could mix images.
    cfg = _cfg("dpeformer.min_selected=32", f"dpeformer.fbm_head_merge={head_merge}")
    assert _cfg().dpeformer.fbm_head_merge == "per_image"                  # the paper's behaviour is the default
    torch.manual_seed(6)
    model = _model(cfg).eval()
    images = torch.randn(4, 3, 128, 64)
    neighbour_changed = images.clone()
    neighbour_changed[1] = torch.randn(3, 128, 64)                        # image 1 shares image 0's FBM pair
    with torch.no_grad():
        first, second = model(images)[0], model(neighbour_changed)[0]
    change = float((first - second).norm() / first.norm())
    if head_merge == "per_image":
        assert change < 1e-5  # the same per-image arithmetic on the same image; float32 rounding at most
    else:
        assert change > 1e-2  # image 0's enriched parts carry half of image 1's attention output


def test_memory_initialisation_logits_and_update_equal_brute_force():
    torch.manual_seed(3)
    memory = ClassCentroidMemory(3, 4, temperature=0.05, momentum=0.2)
    feats, labels = torch.randn(9, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    memory.initialise(feats, labels)
    means = torch.stack([feats[labels == c].mean(0) for c in range(3)])
    torch.testing.assert_close(memory.features, F.normalize(means, dim=1))
    x = torch.randn(2, 4)
    torch.testing.assert_close(memory.logits(x), F.normalize(x, dim=1) @ memory.features.t() / 0.05)
    bank = memory.features.clone()
    batch, batch_labels = torch.randn(3, 4), torch.tensor([1, 1, 0])
    for feature, label in zip(batch, batch_labels.tolist()):             # one sample at a time, in order
        row = 0.2 * bank[label] + 0.8 * F.normalize(feature, dim=0)
        bank[label] = row / row.norm()
    memory.update(batch, batch_labels)
    torch.testing.assert_close(memory.features, bank)
    with pytest.raises(ValueError, match="no feature"):
        ClassCentroidMemory(4, 4).initialise(feats, labels)


def test_loss_terms_and_published_weights_and_memory_update():
    torch.manual_seed(4)
    cfg = _cfg()
    model, criterion = _model(cfg).train(), build_criterion(cfg)
    images, labels = torch.randn(8, 3, 128, 64), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    model.memory.initialise(torch.randn(7, 768), torch.arange(7))
    bank = model.memory.features.clone()
    out = model(images, view2=images.flip(-1))
    terms = criterion(out, labels)
    ce = lambda logits: F.cross_entropy(logits.detach(), labels)  # noqa: E731  (no label smoothing; values only)
    expected = {"id_concat": np.mean([float(ce(t)) for t in out.concat_logits]),
                "id_global": np.mean([float(ce(t)) for t in out.global_logits]),
                "id_parts": np.mean([float(ce(t)) for t in out.part_logits]),
                "memory": float(ce(F.normalize(out.stripes[0], dim=1) @ bank.t() / 0.05)),
                "memory_view2": float(ce(F.normalize(out.stripes[1], dim=1) @ bank.t() / 0.05))}
    for name, value in expected.items():
        assert float(terms[name].detach()) == pytest.approx(value, rel=1e-5), name
    total = (expected["id_concat"] + 2 * expected["id_global"] + expected["id_parts"] + expected["memory"]
             + 0.3 * expected["memory_view2"])
    assert float(terms["loss"].detach()) == pytest.approx(total, rel=1e-5)
    updated = ClassCentroidMemory(7, 768)
    updated.features.copy_(bank)
    updated.update(out.stripes[0].detach(), labels)                         # only view 1 updates the bank
    torch.testing.assert_close(model.memory.features, updated.features)
    terms["loss"].backward()                                                # the update does not break autograd
    assert model.global_classifier.weight.grad is not None


def test_two_view_training_set(synthetic_world):
    items = [(str(p), 0, 0) for p in sorted((synthetic_world / "market" / "query").iterdir())[:2]]
    occluders = str(synthetic_world / "occluders")
    torch.manual_seed(5)
    for view2 in ("occluder", "erasing"):
        cfg = _cfg(f"dpeformer.view2={view2}", f"data.occluder_dir={occluders}", "data.flip_p=0.0",
                   "data.padding=0", "data.color_jitter=[]")
        dataset = build_two_view_train_set(items, cfg)
        assert isinstance(dataset, TwoViewDataset)
        sample = dataset[0]
        assert sample["img"].shape == sample["view2"].shape == (3, 128, 64)
        changed = (sample["img"] != sample["view2"]).any(0)
        assert 0.02 < float(changed.float().mean()) < 0.9                   # view 2 = view 1, partly covered


@pytest.mark.parametrize("value", ["", "no/such/folder"])
def test_missing_occluder_folder_says_how_to_build_it(value, tmp_path):
    items = [(str(tmp_path / "0001_c1_f0.jpg"), 0, 0)]
    with pytest.raises(ConfigError) as error:
        build_two_view_train_set(items, _cfg(f"data.occluder_dir={value and tmp_path / value}"))
    message = str(error.value)
    assert "'data.occluder_dir'" in message and ("is empty" if not value else "does not exist") in message
    for needed in ("RGBA *.png", "SA-1B-crop", "zhangxin06/DPEFormer", "black outside the segment",
                   "tools/prepare_occluders.py --source", "dpeformer.view2=erasing"):
        assert needed in message, needed


def test_test_feature_uses_the_default_normalised_distance():
    assert get_method("dpeformer").build_test_distance is None             # normalised Euclidean on x1_new


@pytest.mark.slow
def test_short_training_on_the_generated_occluded_world(tmp_path, synthetic_world):
    world = synthetic_world
    common = [f"data.root={world}/market_occluded", "train.epochs=4", "eval.period=4", "optim.warmup_epochs=1"]
    result = run_training(_cfg(f"train.output_dir={tmp_path / 'dpeformer'}", f"data.occluder_dir={world / 'occluders'}",
                               *common))
    assert result.final_model is not None and 0.0 < result.final_metrics["mAP"] <= 1.0
    from passreid.finetune import load_finetuned_model

    model, _, _ = load_finetuned_model(result.final_model)
    assert float(model.memory.features.norm(dim=1).min()) == pytest.approx(1.0, abs=1e-4)  # saved and restored
    # The comparison with the baseline at the demo's budget is finetune/README.md's table (one run each).
    print(f"\ngenerated market_occluded, 4 epochs: dpeformer mAP {result.final_metrics['mAP']:.3f}")


def test_prepare_occluders_turns_the_released_crop_layout_into_an_occluder_folder(tmp_path, capsys):
    from _tool_loading import load_tool_module
    from PIL import Image

    from passreid.data.occluders import OccluderPaste

    tool = load_tool_module(Path(__file__).resolve().parents[1] / "tools" / "prepare_occluders.py", "prepare_occ")
    source = tmp_path / "SA-1B-crop"                      # released layout: <root>/<group>/<crop>, black outside
    (source / "sa_1").mkdir(parents=True)
    (source / "sa_2").mkdir()
    crop = np.zeros((20, 10, 3), dtype=np.uint8)
    crop[3:9, 2:6] = (200, 30, 0)                            # the segment: 6 rows x 4 columns, one channel 0
    Image.fromarray(crop).save(source / "sa_1" / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(source / "sa_2" / "empty.png")
    output = tmp_path / "occluders"
    assert tool.main(["--source", str(source), "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 RGBA cut-outs" in out and "skipped 1 all-black" in out
    written = sorted(p.name for p in output.iterdir())
    assert written == ["sa_1__a.png"]
    with Image.open(output / "sa_1__a.png") as image:
        assert image.mode == "RGBA" and image.size == (4, 6)
        pixels = np.asarray(image)
    assert (pixels[..., 3] == 255).all() and (pixels[..., :3] == (200, 30, 0)).all()
    assert len(OccluderPaste(output, p=1.0).occluders) == 1  # what data.occluder_dir accepts
    assert tool.main(["--source", str(tmp_path / "missing"), "--output", str(output)]) == 2
    assert "does not exist" in capsys.readouterr().err
