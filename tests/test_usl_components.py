"""Cluster-Contrast building blocks: sampler, clustering step, features, schedule, configs."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from passreid.config import ConfigError, load_config
from passreid.engine import warmup_step_lr
from passreid.models import build_vit
from passreid.models.reid import ReIDModel, TokenHead
from passreid.usl import (ClusterConfig, ClusterContrastNet, PseudoLabelSampler, UslConfig, cluster_centroids,
                          cluster_features, cluster_statistics, validate_usl_config)

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------- sampler


def _toy_labels(seed: int = 0, num_ids: int = 12):
    rng = np.random.default_rng(seed)
    labels, camids = [], []
    for pid in range(num_ids):
        size = int(rng.integers(1, 14))
        labels += [pid] * size
        camids += rng.integers(0, 1 if pid == 3 else 4, size).tolist()  # id 3 is seen by one camera only
    order = rng.permutation(len(labels))
    return np.asarray(labels)[order], np.asarray(camids)[order]


def _split_pass(stream, labels):
    """Cut a pass into per-identity blocks (an identity's block is its anchor plus its draws)."""
    blocks, current = [], [stream[0]]
    for index in stream[1:]:
        if labels[index] == labels[current[0]] and len(current) < 8:
            current.append(index)
        else:
            blocks.append(current)
            current = [index]
    return blocks + [current]


def test_one_pass_follows_the_published_rules():
    labels, camids = _toy_labels()
    sampler = PseudoLabelSampler(labels, camids, batch_size=16, num_instances=4, iters=5, seed=3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        stream = sampler.one_pass(rng)
        blocks = _split_pass(stream, labels)
        visited = [labels[block[0]] for block in blocks]
        assert sorted(visited) == sorted(set(labels.tolist()))  # every identity exactly once
        for block in blocks:
            anchor, draws = block[0], block[1:]
            members = np.flatnonzero(labels == labels[anchor])
            if len(members) == 1:
                assert draws == []
                continue
            assert len(draws) == 3
            other_cams = [m for m in members if camids[m] != camids[anchor]]
            candidates = other_cams or [m for m in members if m != anchor]
            assert set(draws) <= set(candidates)
            if len(candidates) >= 4:
                assert len(set(draws)) == 3  # without replacement


def test_epoch_batches_are_deterministic_and_ranks_split_each_global_batch():
    labels, camids = _toy_labels(1)
    single = PseudoLabelSampler(labels, camids, batch_size=16, num_instances=4, iters=7, seed=5)
    batches = single.global_batches(2)
    assert len(batches) == 7 and all(len(b) == 16 for b in batches)
    assert batches == PseudoLabelSampler(labels, camids, 16, 4, 7, seed=5).global_batches(2)
    assert batches != single.global_batches(3)
    ranks = [PseudoLabelSampler(labels, camids, 16, 4, 7, seed=5, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    per_rank = [list(r) for r in ranks]
    rebuilt = [per_rank[0][i * 8:(i + 1) * 8] + per_rank[1][i * 8:(i + 1) * 8] for i in range(7)]
    assert rebuilt == batches


def test_sampler_resumes_mid_epoch():
    labels, camids = _toy_labels(2)
    sampler = PseudoLabelSampler(labels, camids, 16, 4, 6, seed=1)
    sampler.set_epoch(4)
    full = list(sampler)
    fresh = PseudoLabelSampler(labels, camids, 16, 4, 6, seed=1)
    fresh.load_state_dict({"epoch": 4, "position": 40})
    fresh.set_epoch(4)
    assert list(fresh) == full[40:]


def test_short_passes_are_chained_into_full_batches():
    labels = np.repeat(np.arange(3), 5)
    camids = np.tile(np.arange(5), 3)
    sampler = PseudoLabelSampler(labels, camids, batch_size=32, num_instances=4, iters=4, seed=0)
    assert sampler.chain_passes  # a pass has 12 images < 32
    batches = sampler.global_batches(0)
    assert len(batches) == 4 and all(len(b) == 32 for b in batches)


def test_sampler_rejects_outliers():
    with pytest.raises(ValueError, match="drop the outliers"):
        PseudoLabelSampler([0, -1, 0], [0, 1, 2], 4, 2, 1)


# ------------------------------------------------------------------------------------------- clustering


def _blobs(num_ids=30, per_id=10, dim=64, noise=1.0, seed=0):
    """Well-separated identity blobs: unit centres plus isotropic noise of norm ~noise, normalised."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_ids, dim, generator=gen), dim=1)
    ids = torch.arange(num_ids).repeat_interleave(per_id)
    feats = centres[ids] + noise * torch.randn(len(ids), dim, generator=gen) / dim ** 0.5
    return F.normalize(feats, dim=1), ids.numpy()


def test_clustering_step_recovers_blobs():
    feats, ids = _blobs()
    # The normalised variant: the raw norm does not matter.
    pseudo = cluster_features(feats * 3.0, ClusterConfig(eps=0.6, feat_norm=True), true_ids=ids)
    stats = pseudo.stats
    assert stats.num_clusters == 30 and stats.num_outliers == 0
    assert stats.ari == pytest.approx(1.0) and stats.purity == pytest.approx(1.0)
    assert pseudo.centroids.shape == (30, 64)
    for cluster in range(30):
        members = feats[pseudo.labels == cluster] * 3.0
        torch.testing.assert_close(pseudo.centroids[cluster], F.normalize(members.mean(0), dim=0), atol=1e-6,
                                   rtol=0)


def _multi_neck_like(seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Blobs with the row norms of the multi-neck ``cat`` feature (in [1, sqrt 2]; PASS-reID:
    PASS_cluster_contrast_reid/clustercontrast/models/vision_transformer.py with ``--multi-neck``)."""
    feats, ids = _blobs()
    scale = torch.empty(len(feats), 1).uniform_(1.0, 2 ** 0.5, generator=torch.Generator().manual_seed(seed))
    return feats * scale, ids


@pytest.mark.parametrize("feat_norm", [False, True])
def test_cluster_feat_norm_decides_what_reaches_the_jaccard_step(monkeypatch, feat_norm):
    import passreid.cluster.jaccard as jaccard

    seen = []

    def spy(x, k, **kwargs):
        seen.append((x.clone(), kwargs["metric"]))
        return knn(x, k, **kwargs)

    knn = jaccard.knn
    monkeypatch.setattr(jaccard, "knn", spy)
    feats, ids = _multi_neck_like()
    pseudo = cluster_features(feats, ClusterConfig(eps=0.6, feat_norm=feat_norm), true_ids=ids)
    (x, metric), = seen
    if feat_norm:  # the normalised variant: unit rows, inner-product ranking
        torch.testing.assert_close(x, F.normalize(feats, dim=1))
        assert metric == "inner_product"
    else:  # published: the model output as it is, ranked by L2 as faiss IndexFlatL2 does
        assert torch.equal(x, feats)
        assert metric == "sqeuclidean"
    # The memory starts from the normalised means of the raw features in both modes, as published.
    members = feats[pseudo.labels == 0]
    torch.testing.assert_close(pseudo.centroids[0], F.normalize(members.mean(0), dim=0), atol=1e-6, rtol=0)


def test_eval_feat_norm_decides_the_test_distance():
    from passreid.config.schema import EvalConfig
    from passreid.eval import rank_metrics_from_distance
    from passreid.eval.evaluator import evaluate_features
    from passreid.eval.features import ExtractedFeatures

    rng = np.random.default_rng(0)
    # Norms in [1, sqrt 2] (multi-neck cat): raw and normalised squared L2 rank the gallery differently.
    q = rng.normal(size=(12, 8)).astype(np.float32)
    g = rng.normal(size=(40, 8)).astype(np.float32)
    q *= rng.uniform(1.0, 2 ** 0.5, (12, 1)).astype(np.float32) / np.linalg.norm(q, axis=1, keepdims=True)
    g *= rng.uniform(1.0, 2 ** 0.5, (40, 1)).astype(np.float32) / np.linalg.norm(g, axis=1, keepdims=True)
    query = ExtractedFeatures(q, rng.integers(0, 6, 12), np.zeros(12, dtype=np.int64))
    gallery = ExtractedFeatures(g, rng.integers(0, 6, 40), np.ones(40, dtype=np.int64))
    labels = (query.pids, gallery.pids, query.camids, gallery.camids)

    def squared_l2(a, b):
        return torch.from_numpy(((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1))

    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    for feat_norm, (a, b) in ((False, (q, g)), (True, (unit(q), unit(g)))):
        got = evaluate_features(query, gallery, EvalConfig(feat_norm=feat_norm)).plain
        expected = rank_metrics_from_distance(squared_l2(a, b), *labels)
        assert got.mAP == pytest.approx(expected.mAP, abs=1e-6)  # float32 vs float64 distances, no near ties
        np.testing.assert_allclose(got.cmc, expected.cmc, atol=1e-6)
    raw, normalised = (evaluate_features(query, gallery, EvalConfig(feat_norm=f)).plain for f in (False, True))
    assert raw.mAP != pytest.approx(normalised.mAP, abs=1e-4)  # the switch matters on these features


def test_cluster_statistics_against_a_direct_count():
    labels = np.array([0, 0, 0, 1, 1, -1, 2, 2, -1, 1])
    truth = np.array([5, 5, 6, 7, 7, 7, 8, 9, 8, 6])
    stats = cluster_statistics(labels, truth)
    assert (stats.num_clusters, stats.num_outliers, stats.num_samples) == (3, 2, 10)
    majority = sum(Counter(truth[labels == c].tolist()).most_common(1)[0][1] for c in range(3))
    assert stats.purity == pytest.approx(majority / 8)
    from sklearn.metrics import adjusted_rand_score
    assert stats.ari == pytest.approx(adjusted_rand_score(truth, labels))
    assert stats.ari_clustered == pytest.approx(adjusted_rand_score(truth[labels >= 0], labels[labels >= 0]))
    assert cluster_statistics(labels, None).purity is None


def test_centroids_ignore_outliers():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [0.0, 2.0]])
    centroids = cluster_centroids(feats, np.array([0, 0, -1, 1]))
    torch.testing.assert_close(centroids, torch.tensor([[0.5 ** 0.5, 0.5 ** 0.5], [0.0, 1.0]]))


# ---------------------------------------------------------------------------------------------- features


def _published_feature(tokens, head, fusion, multi_neck):
    """The published feature of each neck / fusion mode, written out (PASS-reID:
    PASS_cluster_contrast_reid/clustercontrast/models/vision_transformer.py)."""
    cls, parts = tokens[:, 0], tokens[:, 1:4]
    p_mean = parts.mean(1)
    if not multi_neck:
        fused = torch.cat([cls, p_mean], 1) if fusion == "cat" else (cls + p_mean) / 2
        return F.normalize(head.necks[0](fused), dim=1)
    c = F.normalize(head.necks[0](cls), dim=1)
    p = sum(F.normalize(head.necks[k + 1](parts[:, k]), dim=1) for k in range(3)) / 3
    return torch.cat([c, p], 1) if fusion == "cat" else (c + p) / 2


@pytest.mark.parametrize("fusion", ["cat", "mean"])
@pytest.mark.parametrize("multi_neck", [False, True])
def test_normalized_neck_feature_is_the_published_one(fusion, multi_neck):
    torch.manual_seed(0)
    head = TokenHead(8, 3, num_parts=3, fusion=fusion, multi_neck=multi_neck, normalize_necks=True).eval()
    for neck in head.necks:  # non-trivial statistics
        neck.running_mean.normal_()
        neck.running_var.uniform_(0.5, 2.0)
        neck.weight.data.uniform_(0.5, 1.5)
    tokens = torch.randn(5, 4, 8)
    torch.testing.assert_close(head(tokens).after, _published_feature(tokens, head, fusion, multi_neck))


def test_ghost_batch_norm_matches_per_chunk_heads_and_keeps_first_chunk_statistics():
    torch.manual_seed(0)
    backbone = build_vit("vit_tiny", img_size=(32, 16), patch_size=16, stride_size=16, num_part_tokens=3)
    model = ReIDModel(backbone, 1, head="pass", multi_neck=True, normalize_necks=True, neck_feat="after")
    reference = ReIDModel(build_vit("vit_tiny", img_size=(32, 16), patch_size=16, stride_size=16, num_part_tokens=3),
                          1, head="pass", multi_neck=True, normalize_necks=True, neck_feat="after")
    reference.load_state_dict(model.state_dict())
    model.train(), reference.train()
    images = torch.randn(12, 3, 32, 16)
    out = ClusterContrastNet(model, ghost_bn_size=4)(images)
    tokens = reference.backbone(images)
    first = reference.head(tokens[:4]).after
    stats_after_first = [n.running_mean.clone() for n in reference.head.necks]
    rest = [reference.head(chunk).after for chunk in tokens[4:].split(4)]
    torch.testing.assert_close(out, torch.cat([first] + rest), rtol=1e-5, atol=1e-6)
    for neck, expected in zip(model.head.necks, stats_after_first):
        torch.testing.assert_close(neck.running_mean, expected)
        assert neck.momentum == 0.1  # restored


# ------------------------------------------------------------------------------------- schedule / configs


def test_step_schedule_of_the_pass_scripts():
    optim = UslConfig().optim
    assert (optim.step_size, optim.gamma, optim.warmup_epochs) == (20, 0.1, 0)
    assert [warmup_step_lr(e, optim.lr, optim.step_size, optim.gamma) for e in (0, 19, 20, 39, 40, 49)] == pytest.approx(
        [3.5e-4, 3.5e-4, 3.5e-5, 3.5e-5, 3.5e-6, 3.5e-6])


RECIPES = {
    "usl/market_pass_vit_s.yaml": dict(eps=0.6, fusion="cat", multi_neck=False, ghost=64),
    "usl/msmt17_pass_vit_s.yaml": dict(eps=0.7, fusion="mean", multi_neck=False, ghost=128),
    "uda/msmt2market_pass_vit_s.yaml": dict(eps=0.6, fusion="cat", multi_neck=True, ghost=64),
    "uda/market2msmt_pass_vit_s.yaml": dict(eps=0.7, fusion="mean", multi_neck=True, ghost=128),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_hold_the_published_settings(name):
    expected = RECIPES[name]
    cfg = validate_usl_config(load_config(UslConfig, REPO / "configs" / name, []))
    assert cfg.cluster.eps == expected["eps"] and cfg.cluster.k1 == 30 and cfg.cluster.k2 == 6
    assert cfg.cluster.min_samples == 4
    assert cfg.model.feat_fusion == expected["fusion"] and cfg.model.multi_neck == expected["multi_neck"]
    assert cfg.model.arch == "vit_small" and list(cfg.model.img_size) == [256, 128]
    assert cfg.model.drop_path_rate == 0.3 and cfg.model.normalize_necks
    assert (cfg.data.batch_size, cfg.data.num_instances, cfg.train.iters, cfg.train.epochs) == (256, 8, 200, 50)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.step_size) == ("sgd", 3.5e-4, 5e-4, 20)
    assert (cfg.memory.temperature, cfg.memory.momentum, cfg.memory.use_hard) == (0.05, 0.2, True)
    assert cfg.train.ghost_bn_size == expected["ghost"]
    assert tuple(cfg.data.pixel_mean) == (0.5, 0.5, 0.5)
    # Cluster-Contrast's transforms and un-normalised features (cluster_contrast_train_usl.py, evaluators.py).
    assert (cfg.data.erasing, cfg.data.erasing_p, cfg.data.test_interpolation) == ("cluster_contrast", 0.5, "bicubic")
    assert not cfg.cluster.feat_norm and not cfg.eval.feat_norm


@pytest.mark.parametrize("world_size, warned", [(1, False), (2, False), (4, False), (8, True), (3, True)])
def test_ghost_bn_chunks_that_the_process_count_cannot_give_are_named(world_size, warned):
    from passreid.usl.config import ghost_bn_mismatch

    # The Market recipe: 256 images, BN over chunks of 64 (the published 4-GPU DataParallel split).
    message = ghost_bn_mismatch(256, world_size, 64)
    assert (message is not None) == warned
    if world_size == 8:
        assert "normalise 32 images at once, not the recipe's chunks of 64" in message
    assert ghost_bn_mismatch(256, 8, 0) is None  # ghost BN off: each process's batch, nothing to warn about


def test_recipe_loaders_use_the_published_transforms(tmp_path: Path):
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from passreid.data import ImageItem
    from passreid.data.transforms import CLUSTER_CONTRAST_FILL, RandomErasing
    from passreid.data.reid_sets import build_image_train_set
    from passreid.eval.evaluator import build_test_loader

    path = tmp_path / "person.png"
    pixels = np.random.default_rng(0).integers(0, 256, size=(150, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    # Two workers: the recipe's eight would only draw a warning on a small machine; they do not change a pixel.
    cfg = load_config(UslConfig, REPO / "configs" / "usl" / "market_pass_vit_s.yaml", ["data.num_workers=2"])
    items = [ImageItem(str(path), 0, 0)]
    # Clustering and test features: bicubic resize + normalise (1e-6: float32 rounding of the normalisation).
    got = build_test_loader(items, (256, 128), cfg).dataset[0]["img"]
    expected = (TF.to_tensor(TF.resize(Image.open(path), [256, 128], interpolation=InterpolationMode.BICUBIC))
                - 0.5) / 0.5
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    erasing = build_image_train_set(items, cfg.data, (256, 128)).transform.transforms[-1]
    assert isinstance(erasing, RandomErasing) and erasing.fill == CLUSTER_CONTRAST_FILL


def test_model_file_config_reads_as_a_bnneck_fine_tuning_config_and_config_checks():
    from passreid.config import config_from_dict
    from passreid.finetune import FinetuneConfig
    from passreid.models.reid_file import reid_file_config

    cfg = load_config(UslConfig, None, ["model.init_from=x.pth", "model.multi_neck=true", "data.test_batch_size=7"])
    # What model_final.pth stores: the shared sections only, which the fine-tuning loader reads back.
    ft = config_from_dict(FinetuneConfig, reid_file_config("bnneck", cfg.model, cfg.data, cfg.eval))
    assert ft.method == "bnneck" and ft.model.neck_feat == "after" and ft.model.normalize_necks
    assert ft.model.multi_neck and not hasattr(ft.model, "init_from") and ft.data.test_batch_size == 7
    assert (ft.data.erasing, ft.data.test_interpolation, ft.eval.feat_norm) == ("cluster_contrast", "bicubic", False)
    with pytest.raises(ConfigError, match="model.arch"):
        validate_usl_config(load_config(UslConfig, None, ["model.arch=resnet50"]))
    with pytest.raises(ConfigError, match="data.batch_size"):  # a check of the shared sections
        validate_usl_config(load_config(UslConfig, None, ["data.batch_size=30"]))
    with pytest.raises(ConfigError, match="model.init_from"):
        validate_usl_config(load_config(UslConfig, None, ["model.init_from=a.pth", "model.pretrained=b.pth"]))
    with pytest.raises(ConfigError, match="model.jpm"):
        validate_usl_config(load_config(UslConfig, None, ["model.jpm=true"]))
    with pytest.raises(ConfigError, match="memory.momentum"):
        validate_usl_config(load_config(UslConfig, None, ["memory.momentum=1.0"]))
