"""DPM (method: dpm): mask generator, losses, test distance, the two-pass optimisation, resume, the demo."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from passreid.config import config_to_dict, load_config
from passreid.engine import Checkpointer
from passreid.eval import rank_metrics, rank_metrics_from_distance
from passreid.eval.evaluator import extract_split
from passreid.finetune import FinetuneConfig, FinetuneTrainer, load_finetuned_model, run_training
from passreid.data.reid_sets import load_test_dataset
from passreid.finetune.dpm import (DPMModel, QueryMaskedDistance, arcface_logits, build_dpm_model,
                                   masked_prototype_cosine, orthogonality_loss, query_masked_distance)
from passreid.finetune.meta_arch import ReIDBatch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "finetune"
DEMO_DPM = CONFIGS / "demo_dpm.yaml"
# demo_dpm.yaml as shipped ends at mAP 0.156 on the generated occluded test split (finetune/README.md, "DPM");
# random features score about 0.057 there. The bound leaves room for differences between machines and torch builds.
# Plumbing tests: the demo at half the batch, evaluation only at the end.
SMALL = ["data.batch_size=16", "train.log_period=1", "eval.period=100", "train.checkpoint_period=100",
         "data.test_batch_size=256"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(output_dir: Path, world: Path, *overrides: str, path: Path = DEMO_DPM) -> FinetuneConfig:
    return load_config(FinetuneConfig, path, [f"train.output_dir={output_dir}", f"data.root={world}/market_occluded", *overrides])


def _records(output_dir: Path, split: str) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _tiny_model(num_classes: int = 6, **overrides) -> DPMModel:
    torch.manual_seed(0)
    cfg = load_config(FinetuneConfig, DEMO_DPM, [f"{k}={v}" for k, v in overrides.items()])
    return build_dpm_model(cfg, num_classes, 4, load_weights=False)


# ------------------------------------------------------------------ model, published shapes


def test_published_recipes_and_the_vit_b_mask_generator_shapes():
    duke = load_config(FinetuneConfig, CONFIGS / "occluded_duke" / "dpm_vit_b_256.yaml", [])
    assert duke.method == "dpm" and duke.dpm.mask_blocks == [2, 4, 10, 12]
    assert (duke.model.arch, duke.model.stride_size, duke.model.sie_camera, duke.model.jpm) == ("vit_base", 11, True, False)
    assert (duke.train.epochs, duke.optim.lr, duke.optim.warmup_epochs, duke.optim.lr_stepping) == (150, 0.008, 5, "transreid")
    assert (duke.dpm.orth_weight, duke.dpm.arc_scale, duke.dpm.arc_margin, duke.dpm.mask_lr) == (0.1, 30.0, 0.5, 0.0)
    occ_reid = load_config(FinetuneConfig, CONFIGS / "occluded_reid" / "dpm_vit_b_256.yaml", [])
    assert (occ_reid.dpm.orth_weight, occ_reid.dpm.arc_margin, occ_reid.model.stride_size) == (0.01, 0.3, 12)
    assert occ_reid.data.color_jitter == [0.3, 0.3, 0.2, 0.2] and occ_reid.data.test_dataset == "occluded_reid"
    # Published Occluded-REID run: SIE on (DPM configs/Market/dpm.yml); SIE off is the named variant.
    assert occ_reid.model.sie_camera is True
    no_sie = load_config(FinetuneConfig, CONFIGS / "occluded_reid" / "dpm_vit_b_256_no_sie.yaml", [])
    assert no_sie.model.sie_camera is False
    assert {**config_to_dict(no_sie), "model": None} == {**config_to_dict(occ_reid), "model": None}
    with torch.device("meta"):  # shapes only, no memory
        model = build_dpm_model(duke, 702, 8, load_weights=False)
    convs = [m for m in model.mask_generator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3072, 1536, (3, 3), (1, 1)), (1536, 768, (3, 3), (1, 1)), (768, 768, (3, 3), (1, 1))]
    assert model.backbone.pos_grid == (22, 11) and model.mask_blocks == (1, 3, 9, 11)
    assert tuple(model.head.classifier.weight.shape) == (702, 768) and tuple(model.sie_embed.shape) == (8, 1, 768)
    assert model.feature_dim == 2 * 768


def test_mask_is_one_half_at_init_and_shapes_follow_the_grid():
    model = _tiny_model()
    generator = model.mask_generator
    assert torch.count_nonzero(generator.fc.weight) == 0 and torch.count_nonzero(generator.fc.bias) == 0
    images = torch.randn(4, 3, 128, 64)
    out = model.train()(images)
    assert out.mask.shape == (4, 192) and torch.all(out.mask == 0.5)
    assert out.logits.shape == out.masked_cosine.shape == (4, 6) and out.feat.shape == (4, 192)
    assert out.orth_maps.shape == (4, 3, 8 * 4)  # 3 heads, [CLS] to the 8x4 patches
    rows = model.eval()(images)
    assert rows.shape == (4, 384) and torch.all(rows[:, 192:] == 0.5)
    # the attention logits are the block's own pre-softmax scores: their softmax is the attention used
    tokens = model.backbone.forward_until(images, model.backbone.depth - 1)
    probabilities = model.backbone.attention_probabilities(model.backbone.depth - 1, tokens)[:, :, 0, 1:]
    expected = torch.softmax(model.backbone.attention_logits(model.backbone.depth - 1, tokens)[:, :, 0], dim=-1)[:, :, 1:]
    torch.testing.assert_close(probabilities, expected)
    with pytest.raises(ValueError, match="at least 4x4"):
        _tiny_model(**{"model.img_size": "[64,32]"})
    with pytest.raises(ValueError, match="dpm.mask_blocks"):
        _tiny_model(**{"dpm.mask_blocks": "[2,4,10,12]"})  # vit_tiny has 4 blocks


# ---------------------------------------------------------------------------------- losses


def test_orthogonality_loss_matches_the_formula_and_vanishes_for_orthonormal_maps():
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 4, 10, generator=generator)
    expected = 0.0
    for b in range(3):
        rows = [maps[b, k] / math.sqrt(float(maps[b, k].pow(2).sum()) + 1e-6) for k in range(4)]
        for i in range(4):
            for j in range(4):
                expected += (float(rows[i] @ rows[j]) - (1.0 if i == j else 0.0)) ** 2 / 16
    assert float(orthogonality_loss(maps)) == pytest.approx(expected, rel=1e-5)
    q, _ = torch.linalg.qr(torch.randn(10, 4, generator=generator, dtype=torch.float64))
    orthogonal = (q.t() * torch.tensor([[3.0], [0.5], [7.0], [1.0]], dtype=torch.float64)).float()  # any row scale
    assert float(orthogonality_loss(orthogonal.unsqueeze(0).repeat(2, 1, 1))) < 1e-9
    assert float(orthogonality_loss(torch.ones(1, 4, 10))) == pytest.approx(12 / 16, rel=1e-5)  # identical rows


def test_arcface_margin_values_for_known_cosines():
    cosine = torch.tensor([[0.8, 0.3, -0.2], [-0.95, 0.1, 0.5]])
    logits = arcface_logits(cosine, torch.tensor([0, 0]), scale=30.0, margin=0.5)
    # cos(theta + m) = cos t cos m - sin t sin m = 0.8 cos 0.5 - 0.6 sin 0.5 = 0.414411
    assert float(logits[0, 0]) == pytest.approx(30 * 0.414411, abs=1e-4)
    # theta + m beyond pi: cos(theta) - m sin(pi - m) instead
    assert float(logits[1, 0]) == pytest.approx(30 * (-0.95 - 0.5 * math.sin(math.pi - 0.5)), rel=1e-5)
    torch.testing.assert_close(logits[:, 1:], 30 * cosine[:, 1:])  # other classes: s cos
    assert float(arcface_logits(cosine, torch.tensor([2, 1]), margin=0.0)[0, 2]) == pytest.approx(30 * -0.2)


def test_masked_prototype_cosine_matches_the_per_image_loop():
    generator = torch.Generator().manual_seed(1)
    feats, weight = torch.randn(5, 8, generator=generator), torch.randn(7, 8, generator=generator)
    masks = torch.rand(5, 8, generator=generator)
    rows = []
    for i in range(5):  # the published per-image loop
        prototypes = F.normalize(masks[i : i + 1] * F.normalize(weight))
        rows.append(F.linear(F.normalize(feats[i : i + 1]), prototypes))
    torch.testing.assert_close(masked_prototype_cosine(feats, masks, weight), torch.cat(rows), rtol=1e-5, atol=1e-6)


def test_dpm_criterion_terms_and_weights():
    from passreid.finetune.dpm import DPMCriterion, DPMTrainOutput
    from passreid.losses.reid import batch_hard_triplet_loss

    generator = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    output = DPMTrainOutput(logits=torch.randn(6, 3, generator=generator),
                            masked_cosine=torch.rand(6, 3, generator=generator) * 2 - 1,
                            feat=torch.randn(6, 8, generator=generator), mask=torch.rand(6, 8, generator=generator),
                            orth_maps=torch.randn(6, 2, 5, generator=generator))
    terms = DPMCriterion(orth_weight=0.1)(output, labels)
    id_plain = F.cross_entropy(output.logits, labels)
    id_arc = F.cross_entropy(arcface_logits(output.masked_cosine, labels), labels)
    orth, triplet = orthogonality_loss(output.orth_maps), batch_hard_triplet_loss(output.feat, labels)
    torch.testing.assert_close(terms["id"], 0.5 * id_plain + 0.5 * id_arc)
    torch.testing.assert_close(terms["loss"], 0.5 * id_plain + 0.5 * id_arc + 0.1 * orth + triplet)
    assert set(terms) == {"loss", "id", "id_plain", "id_arc", "orth", "triplet", "acc"}
    from passreid.config import ConfigError
    from passreid.finetune.dpm import build_dpm_criterion

    for bad in ("dpm.arc_margin=2.0", "dpm.orth_weight=-1"):
        with pytest.raises(ConfigError, match="dpm"):
            build_dpm_criterion(load_config(FinetuneConfig, DEMO_DPM, [bad]))


# ---------------------------------------------------------------------------------- test distance


def test_query_masked_distance_matches_brute_force_and_chunks():
    generator = torch.Generator().manual_seed(3)
    dim = 6
    query = torch.cat([torch.randn(9, dim, generator=generator), torch.rand(9, dim, generator=generator)], 1)
    gallery = torch.cat([torch.randn(13, dim, generator=generator), torch.rand(13, dim, generator=generator)], 1)
    gallery[4, :dim] = query[2, :dim] * 3.0  # an exact match (similarity 1) exercises the clip
    expected = np.zeros((9, 13))
    for i in range(9):
        f_q, m_q = query[i, :dim].double(), query[i, dim:].double()
        f_q = f_q / f_q.norm()
        for j in range(13):
            f_g = gallery[j, :dim].double()
            masked = m_q * (f_g / f_g.norm())
            similarity = float(f_q @ (masked / masked.norm()))
            expected[i, j] = math.acos(min(max(similarity, -1 + 1e-5), 1 - 1e-5))
    fn = QueryMaskedDistance(query, gallery, device="cpu")
    assert np.allclose(fn(0, 9).numpy(), expected, atol=1e-5)
    assert np.allclose(torch.cat([fn(0, 4), fn(4, 9)]).numpy(), expected, atol=1e-5)
    assert fn(3, 5).shape == (2, 13)
    # the gallery masks are not used
    other = gallery.clone()
    other[:, dim:] = torch.rand(13, dim, generator=generator)
    torch.testing.assert_close(query_masked_distance(query, other, "cpu"), fn(0, 9))
    pids, g_pids = np.arange(9) % 4, np.arange(13) % 4
    cams, g_cams = np.zeros(9, int), np.ones(13, int)
    chunked = rank_metrics_from_distance(fn, pids, g_pids, cams, g_cams, chunk_size=2, device="cpu")
    full = rank_metrics_from_distance(torch.from_numpy(expected).float(), pids, g_pids, cams, g_cams, device="cpu")
    assert chunked.mAP == pytest.approx(full.mAP, abs=1e-9)
    with pytest.raises(ValueError, match="feature"):
        QueryMaskedDistance(query[:, :5], gallery[:, :5])


# ------------------------------------------------------------------------- two optimisers, resume


def test_second_pass_steps_only_the_mask_generator(tmp_path, synthetic_world):
    trainer = FinetuneTrainer(_cfg(tmp_path / "run", synthetic_world, *SMALL, f"data.occluder_dir={synthetic_world / 'occluders'}"),
                              resume=False)
    model, optimizer = trainer.model, trainer.optimizer
    mask_names = {n for n, _ in model.named_parameters() if n.startswith("mask_generator.")}
    meta = trainer.meta
    assert meta.second_pass.names == mask_names and len(mask_names) == 14
    main_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert main_ids == {id(p) for n, p in trainable.items() if n not in mask_names}
    groups = meta.second_pass.optimizer.param_groups
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in groups} == {"default": (0.01, 5e-4), "bias": (0.01, 5e-4)}

    batch = next(iter(torch.utils.data.DataLoader(trainer.train_set, batch_size=16, sampler=trainer.sampler)))
    images, pids, camids = batch["img"], batch["pid"], batch["camid"]
    before = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model)
    loss = meta.second_pass_step(ReIDBatch(images, pids, camids, {}))
    after = model.state_dict()
    changed = {n for n, _ in model.named_parameters() if not torch.equal(before[n], after[n])}
    assert changed and changed <= mask_names
    assert {n for n in mask_names if n.endswith("fc.weight")} <= changed
    # Same step by hand: first SGD step with momentum is p - lr (g + wd p), g from loss.backward().
    terms = meta.criterion(reference(images, camids=camids), pids)
    assert float(terms["loss"].detach()) == pytest.approx(loss, rel=1e-6)
    terms["loss"].backward()
    for name, param in reference.named_parameters():
        if name in mask_names:
            expected = param.detach() - 0.01 * (param.grad + 5e-4 * param.detach())
            torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in meta.second_pass_params)


def test_resume_continues_with_the_same_losses_and_rebuilds_the_model(tmp_path, synthetic_world):
    """Stopped at iteration 3 mid-epoch and resumed to 5: steps 4 and 5 equal the uninterrupted run."""
    common = [*SMALL, "train.epochs=3"]
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    run_training(_cfg(reference_dir, synthetic_world, *common, "train.max_iters=5"), resume=False)
    run_training(_cfg(resumed_dir, synthetic_world, *common, "train.max_iters=3"), resume=False)
    state = Checkpointer(resumed_dir).load()
    assert state["iteration"] == 3 and state["sampler"]["position"] > 0
    assert state["extra"]["second_pass_optimizer"]["state"]  # momentum buffers of the mask optimizer
    run_training(_cfg(resumed_dir, synthetic_world, *common, "train.max_iters=5"), resume=True)
    expected = {r["step"]: r for r in _records(reference_dir, "train")}
    resumed = {r["step"]: r for r in _records(resumed_dir, "train")}
    assert sorted(resumed) == sorted(expected) == [1, 2, 3, 4, 5]
    for step in (4, 5):
        for key in ("loss", "id", "id_plain", "id_arc", "orth", "triplet", "second_pass_loss", "lr"):
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-9), (step, key)
    # model_final.pth and checkpoint.pth rebuild the DPM model (mask generator included)
    model, cfg, _ = load_finetuned_model(resumed_dir / "model_final.pth")
    assert isinstance(model, DPMModel) and cfg.method == "dpm" and not model.training
    from_checkpoint, _, _ = load_finetuned_model(resumed_dir / "checkpoint.pth")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in from_checkpoint.state_dict().items())


# ------------------------------------------------------------------------------------- the demo


def _random_feature_map(dataset) -> float:
    generator = np.random.default_rng(0)
    return float(np.mean([
        rank_metrics(generator.normal(size=(len(dataset.query), 64)), generator.normal(size=(len(dataset.gallery), 64)),
                     [i.pid for i in dataset.query], [i.pid for i in dataset.gallery],
                     [i.camid for i in dataset.query], [i.camid for i in dataset.gallery]).mAP
        for _ in range(5)
    ]))


@pytest.mark.slow
def test_demo_dpm_trains_on_the_occluded_world_with_its_own_test_distance(tmp_path, synthetic_world, capsys):
    # The demo as shipped (60 epochs, 180 iterations); its comparison with the demo_occluded baseline at the same
    # budget is finetune/README.md's table.
    dpm = run_training(_cfg(tmp_path / "dpm", synthetic_world), resume=False)
    cfg = load_config(FinetuneConfig, tmp_path / "dpm" / "config.yaml")
    dataset = load_test_dataset(cfg.data)
    random_map = _random_feature_map(dataset)
    with capsys.disabled():
        print(f"\ngenerated market_occluded, {dpm.iterations} iterations: DPM mAP {dpm.final_metrics['mAP']:.3f} "
              f"R1 {dpm.final_metrics['rank1']:.3f}; random features mAP {random_map:.3f}")
    # The demo's mAP (0.098-0.13 across machines, random features 0.057) moves with the CPU kernels by
    # about as much as it sits above chance, so it is printed, not asserted. What holds on every run is
    # that the DPM objective is learnt: on 24 identities (chance accuracy 0.04) the batches logged at
    # iterations 160 and 180 are > 0.5 correct (0.86-0.89 measured) and the loss at iteration 180 is
    # below half of the loss at iteration 20 (3.6 against 13.4 measured).
    train = _records(tmp_path / "dpm", "train")
    assert np.mean([r["acc"] for r in train[-2:]]) > 0.5, train[-2:]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"], (train[0], train[-1])
    # The reported numbers come from the query-masked distance: recompute them from the rebuilt model.
    model, _, _ = load_finetuned_model(tmp_path / "dpm" / "model_final.pth")
    query = extract_split(model, dataset.query, (128, 64), cfg, torch.device("cpu"))
    gallery = extract_split(model, dataset.gallery, (128, 64), cfg, torch.device("cpu"))
    labels = (query.pids, gallery.pids, query.camids, gallery.camids)
    masked = rank_metrics_from_distance(QueryMaskedDistance(query.feats, gallery.feats, "cpu"), *labels, device="cpu")
    assert masked.mAP == pytest.approx(dpm.final_metrics["mAP"], abs=1e-9)
    assert float(np.ptp(query.feats[:, 192:])) > 0  # the masks are no longer the constant 0.5
    plain = rank_metrics(query.feats[:, :192], gallery.feats[:, :192], *labels, device="cpu")
    assert plain.mAP != pytest.approx(masked.mAP, abs=1e-9)
