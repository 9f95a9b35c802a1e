"""TSD: shapes, decoder and attention-mask semantics, published loss terms and weights, test distance,
the holistic-query split reader and its ALL / NPO / NTP variants, a short training run."""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _inference_models import untrained_final_model
from PIL import Image
from torchvision.ops import sigmoid_focal_loss as torchvision_focal

from passreid.config import load_config
from passreid.data import build_dataset
from passreid.data.datasets import DatasetLayoutError, occlusion_labels_for, read_tsd_gallery_labels
from passreid.data.masks import PART_GROUPINGS, num_parts, part_masks_from_fields
from passreid.eval import rank_metrics_from_distance
from passreid.eval.distance import EvaluationInputError
from passreid.eval.evaluator import extract_split
from passreid.eval.features import ExtractedFeatures
from passreid.eval.occlusion_variants import occlusion_variant_metrics
from passreid.finetune import FinetuneConfig, build_criterion, build_model, get_method, run_training
from passreid.finetune.bpbreid import pack_part_rows, unpack_part_rows
from passreid.finetune.tsd import (MaskedMultiheadAttention, TSDModel, diversity_loss, parsing_loss,
                                   part_averaged_soft_triplet_loss, sigmoid_focal_loss)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, CONFIGS / "demo_tsd.yaml", list(overrides))


def _batch(num_parts: int = 5):
    torch.manual_seed(0)
    return (torch.randn(8, 3, 128, 64), torch.rand(8, num_parts + 1, 32, 16).softmax(1),
            torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))


def test_shapes_initialisation_and_eval_rows():
    model = build_model(_cfg(), num_classes=7, num_cameras=2)
    assert isinstance(model, TSDModel) and model.num_parts == 5 == num_parts("five")
    assert model.query_embedding.shape == (6, 192)                       # q_0 + 5 part queries
    assert float(model.pixel_classifier.classifier.weight.detach().std()) == pytest.approx(0.001, rel=0.2)
    assert model.pixel_classifier.classifier.bias is None and not model.part_neck.bias.requires_grad
    images, masks, _ = _batch()
    out = model.train()(images, masks=masks)
    assert set(out.logits) == {"global", "cat", "cat_m", "aux", "fg"}
    assert all(v.shape == (8, 7) for v in out.logits.values())
    assert {k: tuple(v.shape) for k, v in out.parts.items()} == {k: (8, 5, 192) for k in ("part", "part_m", "aux",
                                                                                           "part_md")}
    assert out.pixel_logits.shape == (8, 32, 6) and out.pixel_targets.shape == (8, 32)   # 8x4 token grid
    assert out.visibility_logits.shape == out.visibility_targets.shape == (8, 5)
    rows = model.eval()(images)
    assert rows.shape == (8, model.feature_dim) == (8, 6 * 192 + 6)
    feats, vis = unpack_part_rows(rows, 6)
    assert bool((vis[:, 0] == 1).all()) and set(vis.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("recipe", ["tsd_vit_b_256.yaml", "tsd_vit_b_256_new_split.yaml"])
def test_recipes_train_the_part_set_of_the_released_script(recipe: str):
    # TSD run_tsd.sh trains MASK_PREPROCESS five / NUM_PARTS 5 (its 'eight' lines are commented out).
    cfg = load_config(FinetuneConfig, CONFIGS / "occluded_duke" / recipe, [])
    assert (cfg.method, cfg.data.mask_preprocess, cfg.optim.lr) == ("tsd", "five", 0.004)
    eight = load_config(FinetuneConfig, CONFIGS / "occluded_duke" / recipe, ["data.mask_preprocess=eight"])
    with torch.device("meta"):  # the 'eight' option still builds (shapes only, no memory)
        assert build_model(cfg, 702, 8, load_weights=False).num_parts == 5
        assert build_model(eight, 702, 8, load_weights=False).num_parts == 8


def test_cls_query_is_detached_and_the_teacher_shares_the_decoder():
    model = build_model(_cfg(), 7, 2).train()
    memory, cls = torch.randn(2, 32, 192), torch.randn(2, 1, 192, requires_grad=True)
    model.decode(memory, cls).sum().backward()
    assert cls.grad is None                                                # CLS.detach() in the query set
    names = [n for n, _ in model.named_parameters() if n.startswith("decoder.")]
    assert not any("teacher" in n for n in names)                          # one decoder for both passes


def test_masked_keys_get_no_attention():
    torch.manual_seed(1)
    attention = MaskedMultiheadAttention(16, num_heads=4, residual=False)
    query, keys = torch.randn(2, 3, 16), torch.randn(2, 10, 16)
    mask = (torch.rand(2, 3, 10) < 0.5).float()
    mask[:, :, 0] = 1.0                                                    # every query keeps one key
    probs = attention.attention(query, keys, mask)
    assert probs.shape == (2, 4, 3, 10)
    assert float(probs.detach().masked_select(mask.unsqueeze(1).expand_as(probs) == 0).max()) < 1e-6
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 3))
    # The output only depends on unmasked values: changing the masked values changes nothing.
    values, single = torch.randn(2, 10, 16), mask[:, :1]                    # one query with its own mask
    a = attention(query[:, :1], keys, values, single)
    b = attention(query[:, :1], keys, values + 100 * (1 - single.transpose(1, 2)), single)
    torch.testing.assert_close(a, b)


def test_teacher_mask_is_sampled_from_the_predicted_parsing(monkeypatch):
    model = build_model(_cfg(), 7, 2).train()
    seen = []
    original = model.decode

    def spy(memory, cls, mask=None):
        seen.append(mask)
        return original(memory, cls, mask)

    monkeypatch.setattr(model, "decode", spy)
    images, masks, _ = _batch()
    model(images, masks=masks)
    assert seen[0] is None and seen[1].shape == (8, 6, 32)                 # student, then teacher (P+1 x N)
    assert set(seen[1].unique().tolist()) <= {0.0, 1.0}
    # Near-uniform parsing at init: about 1/(P+1) of the keys are kept per query.
    assert 0.08 < float(seen[1].mean()) < 0.25


def test_loss_terms_and_published_weights():
    cfg = _cfg()
    model, criterion = build_model(cfg, 7, 2).train(), build_criterion(cfg)
    images, masks, labels = _batch()
    out = model(images, masks=masks)
    terms = criterion(out, labels)
    ids = [f"id_{k}" for k in ("global", "cat", "cat_m", "aux", "fg")]
    triplets = [f"triplet_{k}" for k in ("global", "part", "part_m", "aux")]
    assert set(terms) == {"loss", "acc", *ids, *triplets, "visibility", "mimic", "parsing", "diversity"}
    expected = sum(terms[k] for k in terms if k not in ("loss", "acc"))   # every published weight is 1
    torch.testing.assert_close(terms["loss"], expected)
    for name in ids:
        torch.testing.assert_close(terms[name], F.cross_entropy(out.logits[name[3:]], labels))   # no smoothing
    student = F.normalize(out.parts["part"].flatten(1), dim=1)
    teacher = F.normalize(out.parts["aux"].flatten(1), dim=1)
    torch.testing.assert_close(terms["mimic"], (1 - (student * teacher).sum(1)).mean())
    terms["loss"].backward()


def test_focal_loss_matches_torchvision():
    torch.manual_seed(2)
    logits, targets = torch.randn(6, 5) * 3, (torch.rand(6, 5) > 0.5).float()
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets),
                               torchvision_focal(logits, targets, alpha=0.25, gamma=2.0, reduction="mean"))


def test_diversity_loss_equals_brute_force():
    torch.manual_seed(3)
    parts = torch.randn(3, 8, 6)
    for groups in (None, (0, 1, 1, 2, 3, 3, 4, 4)):
        group = list(range(8)) if groups is None else list(groups)
        per_part = []
        for b, k in itertools.product(range(3), range(8)):
            partners = [l for l in range(8) if group[l] != group[k]]
            cos = [max(float(F.cosine_similarity(parts[b, k], parts[b, l], dim=0)), 0.0) for l in partners]
            per_part.append(sum(cos) / len(cos))
        assert float(diversity_loss(parts, groups)) == pytest.approx(np.mean(per_part), abs=1e-6)


def test_part_averaged_soft_triplet_equals_brute_force():
    torch.manual_seed(4)
    parts, labels = torch.randn(6, 3, 5), torch.tensor([0, 0, 1, 1, 2, 2])

    def dist(i, j):
        return np.mean([max(float((parts[i, k] - parts[j, k]).pow(2).sum()), 1e-12) ** 0.5 for k in range(3)])

    losses = []
    for i in range(6):
        ap = max(dist(i, j) for j in range(6) if labels[j] == labels[i])
        an = min(dist(i, j) for j in range(6) if labels[j] != labels[i])
        losses.append(np.log1p(np.exp(ap - an)))
    assert float(part_averaged_soft_triplet_loss(parts, labels)) == pytest.approx(np.mean(losses), abs=1e-5)


def test_parsing_loss_uses_published_label_smoothing():
    torch.manual_seed(5)
    logits, targets = torch.randn(2, 7, 4), torch.randint(0, 4, (2, 7))
    log_probs = logits.log_softmax(-1)
    expected = 0.0
    for b, n in itertools.product(range(2), range(7)):
        weights = torch.full((4,), 0.1 / 3)
        weights[targets[b, n]] = 0.9
        expected += -float((weights * log_probs[b, n]).sum())
    assert float(parsing_loss(logits, targets, 0.1)) == pytest.approx(expected / 14, abs=1e-5)


def test_mask_grouping_and_threshold_follow_tsd():
    fields = torch.zeros(36, 8, 4)
    fields[5] = 0.4                                                        # left shoulder: arms in 'five'
    target = part_masks_from_fields(fields, "five", None, "threshold", 0.3, 15.0)
    assert target.shape == (6, 8, 4) and bool((target.argmax(0) == 1 + list(PART_GROUPINGS["five"]).index("arms"))
                                              .all())
    assert bool((part_masks_from_fields(fields, "five", None, "threshold", 0.5, 15.0).argmax(0) == 0).all())


def test_test_distance_via_the_method_equals_brute_force():
    torch.manual_seed(6)
    cfg = _cfg()
    q_parts, g_parts = torch.randn(4, 6, 5), torch.randn(5, 6, 5)
    q_vis, g_vis = (torch.rand(4, 6) > 0.5).float(), (torch.rand(5, 6) > 0.5).float()
    q_vis[:, 0], g_vis[:, 0] = 1.0, 1.0
    as_feats = lambda rows: ExtractedFeatures(rows.numpy(), np.zeros(len(rows)), np.zeros(len(rows)))  # noqa: E731
    distance = get_method("tsd").build_test_distance(cfg, as_feats(pack_part_rows(q_parts, q_vis)),
                                                     as_feats(pack_part_rows(g_parts, g_vis)), "cpu")
    got = distance(0, 4)
    qn, gn = F.normalize(q_parts, dim=2), F.normalize(g_parts, dim=2)
    for i, j in itertools.product(range(4), range(5)):
        w = [float(q_vis[i, k] * g_vis[j, k]) ** 0.5 for k in range(6)]
        d = [float((qn[i, k] - gn[j, k]).norm()) for k in range(6)]
        assert float(got[i, j]) == pytest.approx(sum(a * b for a, b in zip(w, d)) / sum(w), abs=1e-5)


# ------------------------------------------------------------------------- holistic-query split and variants


def _variant_brute_force(dist, q_pids, g_pids, q_cams, g_cams, labels, ignored):
    aps, first = [], []
    for i in range(len(q_pids)):
        keep = [j for j in np.argsort(dist[i], kind="stable")
                if not (g_pids[j] == q_pids[i] and (g_cams[j] == q_cams[i] or labels[j] in ignored | {3}))]
        hits = np.array([g_pids[j] == q_pids[i] for j in keep])
        if not hits.any():
            continue
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(precision[hits].mean())
        first.append(int(np.argmax(hits)))
    return np.mean(aps), np.mean([f == 0 for f in first]), len(aps)


def test_occlusion_variants_on_a_hand_made_case():
    # 3 queries (pid 1 cam 0, pid 1 cam 1, pid 2 cam 0) against 8 labelled gallery images.
    q_pids, q_cams = np.array([1, 1, 2]), np.array([0, 1, 0])
    g_pids = np.array([1, 1, 1, 1, 2, 2, 3, 1])
    g_cams = np.array([1, 2, 0, 2, 1, 2, 1, 0])
    labels = np.array([1, 2, 2, 0, 1, 3, 0, 3])
    dist = np.array([[0.5, 0.2, 0.1, 0.3, 0.4, 0.9, 0.05, 0.0],
                     [0.3, 0.6, 0.2, 0.1, 0.7, 0.8, 0.4, 0.05],
                     [0.9, 0.8, 0.7, 0.6, 0.3, 0.1, 0.2, 0.5]])
    # By hand. ALL: q0 keeps 6(-) 1(+) 4(-) 0(+) 5(-) -> AP 1/2; q1 keeps 2(+) 6(-) 1(+) 4(-) 5(-) -> (1 + 2/3)/2;
    # q2 keeps 6(-) 4(+) ... -> 1/2. NPO (positives labelled 2): q0 -> 1/2, q1 -> 5/6, q2 has none.
    # NTP (positives labelled 1): q0 keeps 6(-) 4(-) 0(+) -> 1/3, q1 has none (item 0 is its camera), q2 -> 1/2.
    expected = {"ALL": ([0.5, 5 / 6, 0.5], 1 / 3), "NPO": ([0.5, 5 / 6, np.nan], 0.5), "NTP": ([1 / 3, np.nan, 0.5], 0.0)}
    for variant, (aps, rank1) in expected.items():
        result = occlusion_variant_metrics(lambda idx: torch.as_tensor(dist[idx]), q_pids, g_pids, q_cams, g_cams,
                                           labels, variant, device="cpu")
        np.testing.assert_allclose(result.query_ap, aps)
        assert result.mAP == pytest.approx(np.nanmean(aps)) and result.rank(1) == pytest.approx(rank1)
        ignored = {"ALL": {0}, "NPO": {0, 1}, "NTP": {0, 2}}[variant]
        assert (result.mAP, result.rank(1), result.num_valid_queries) == pytest.approx(
            _variant_brute_force(dist, q_pids, g_pids, q_cams, g_cams, labels, ignored))
    with pytest.raises(EvaluationInputError, match="unknown occlusion variant"):
        occlusion_variant_metrics(lambda idx: dist[idx], q_pids, g_pids, q_cams, g_cams, labels, "BOTH")


def test_occlusion_variants_equal_brute_force_on_random_data():
    rng = np.random.default_rng(7)
    q_pids, q_cams = rng.integers(1, 6, 30), rng.integers(0, 4, 30)
    g_pids, g_cams, labels = rng.integers(0, 6, 120), rng.integers(0, 4, 120), rng.integers(0, 4, 120)
    dist = rng.random((30, 120)).astype(np.float32)
    for variant, ignored in (("ALL", {0}), ("NPO", {0, 1}), ("NTP", {0, 2})):
        result = occlusion_variant_metrics(lambda idx: dist[idx], q_pids, g_pids, q_cams, g_cams, labels, variant,
                                           device="cpu")
        ap, rank1, valid = _variant_brute_force(dist, q_pids, g_pids, q_cams, g_cams, labels, ignored)
        assert result.num_valid_queries == valid and result.mAP == pytest.approx(ap, abs=1e-9)
        assert result.rank(1) == pytest.approx(rank1)
    # Without labels that exclude anything, the variant reduces to the standard protocol.
    plain = rank_metrics_from_distance(torch.as_tensor(dist), q_pids, g_pids, q_cams, g_cams, device="cpu")
    ones = np.ones(120, dtype=np.int64)
    same = occlusion_variant_metrics(lambda idx: dist[idx], q_pids, g_pids, q_cams, g_cams, ones, "ALL", device="cpu")
    assert same.mAP == pytest.approx(plain.mAP) and np.allclose(same.cmc, plain.cmc)


def _write_tsd_folder(root: Path, with_lists: bool = True) -> Path:
    folder = root / "Occluded_Duke"
    names = {"bounding_box_train": ["0001_c1_f0000001.jpg", "0001_c2_f0000002.jpg"],
             "query": ["0005_c1_f0000010.jpg"],
             "bounding_box_test": ["0005_c2_f0000011.jpg", "0005_c3_f0000012.jpg", "0007_c1_f0000013.jpg"]}
    for split, files in names.items():
        (folder / split).mkdir(parents=True)
        for name in files:
            Image.new("RGB", (8, 16)).save(folder / split / name)
    if with_lists:
        (folder / "new_query.txt").write_text("bounding_box_test/0005_c2_f0000011.jpg\n")
        (folder / "new_gallery.txt").write_text("bounding_box_test/0005_c2_f0000011.jpg,3\n"
                                                "bounding_box_test/0005_c3_f0000012.jpg,0\n"
                                                "bounding_box_test/0007_c1_f0000013.jpg,0\n"
                                                "query/0005_c1_f0000010.jpg,2\n")
    return folder


def test_tsd_split_reader_and_labels(tmp_path):
    folder = _write_tsd_folder(tmp_path)
    dataset = build_dataset("occluded_duke_tsd", tmp_path)
    assert [(Path(i.path).name, i.pid, i.camid) for i in dataset.query] == [("0005_c2_f0000011.jpg", 5, 1)]
    assert [Path(i.path).parent.name for i in dataset.gallery] == ["bounding_box_test"] * 3 + ["query"]
    assert {i.pid for i in dataset.train} == {0}
    labels = occlusion_labels_for(dataset.gallery, read_tsd_gallery_labels(folder))
    assert labels == [3, 0, 0, 2]
    assert any("labels 0/1/2/3: 2/0/1/1" in note for note in dataset.notes)


def test_tsd_split_reader_names_missing_list_files(tmp_path):
    _write_tsd_folder(tmp_path, with_lists=False)
    with pytest.raises(DatasetLayoutError, match="new_query.txt.*\n|missing: .*new_query.txt"):
        build_dataset("occluded_duke_tsd", tmp_path)


def test_generated_world_holds_the_tsd_split(synthetic_world):
    """Every world with market_occluded/ reads as occluded_duke_tsd (the figures finetune/README.md quotes)."""
    dataset = build_dataset("occluded_duke_tsd", synthetic_world / "market_occluded")
    assert (len(dataset.query), len(dataset.gallery)) == (67, 197)
    labels = occlusion_labels_for(dataset.gallery, read_tsd_gallery_labels(dataset.root))
    assert [labels.count(label) for label in range(4)] == [77, 3, 50, 67]


@pytest.mark.slow  # a fresh interpreter importing torch + timm: ~10 s of CPU, 30-50 s on a loaded 2-core machine
def test_documented_benchmark_command_runs_on_the_generated_world(synthetic_world, tmp_path):
    """finetune/README.md: ``python -m passreid.finetune.tsd --weights ... --data-root <world>/market_occluded``
    on a world as the demo renders it (a random TSD model: the command, not the scores, is under test)."""
    weights = untrained_final_model(tmp_path / "model_final.pth", _cfg(f"train.output_dir={tmp_path}"))
    result = subprocess.run([sys.executable, "-m", "passreid.finetune.tsd", "--weights", str(weights), "--data-root",
                             str(synthetic_world / "market_occluded"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    for variant in ("ALL", "NPO", "NTP"):
        assert re.search(rf"^{variant} \(\d+ valid queries\)$", result.stdout, re.MULTILINE), result.stdout
    assert result.stdout.count("mAP") == 3


# ------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_short_training_on_the_generated_occluded_world(tmp_path, synthetic_world):
    world = synthetic_world
    common = [f"data.root={world}/market_occluded", "train.epochs=4", "eval.period=4", "optim.warmup_epochs=1"]
    result = run_training(_cfg(f"train.output_dir={tmp_path / 'tsd'}", *common))
    assert result.final_model is not None and 0.0 < result.final_metrics["mAP"] <= 1.0
    # The generated world's TSD-style split (labels from the occluders it pasted) and the three variants.
    from passreid.finetune import load_finetuned_model
    from passreid.finetune.tsd import occlusion_benchmark

    model, stored, _ = load_finetuned_model(result.final_model)
    dataset = build_dataset("occluded_duke_tsd", world / "market_occluded")  # the world writes the lists
    variants = occlusion_benchmark(model, stored, dataset, torch.device("cpu"))
    q = extract_split(model, dataset.query, (128, 64), stored, torch.device("cpu"))
    g = extract_split(model, dataset.gallery, (128, 64), stored, torch.device("cpu"))
    dist = get_method("tsd").build_test_distance(stored, q, g, "cpu")(0, len(q.pids)).numpy()
    labels = occlusion_labels_for(dataset.gallery, read_tsd_gallery_labels(dataset.root))
    for variant, ignored in (("ALL", {0}), ("NPO", {0, 1})):
        ap, rank1, valid = _variant_brute_force(dist, q.pids, g.pids, q.camids, g.camids, np.array(labels), ignored)
        assert variants[variant].mAP == pytest.approx(ap, abs=1e-6) and variants[variant].num_valid_queries == valid
    print("\n" + ", ".join(f"{k} mAP {v.mAP:.3f}" for k, v in variants.items()))
    # The comparison with the baseline at the demo's budget is finetune/README.md's table (one run each).
    print(f"\ngenerated market_occluded, 4 epochs: tsd mAP {result.final_metrics['mAP']:.3f}")
