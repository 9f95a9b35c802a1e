"""Sparse k-reciprocal re-ranking against a dense numpy version written straight from the formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from passreid.eval.distance import EvaluationInputError
from passreid.eval.rerank import re_ranking


def identity_features(num_ids: int, per_id: int, dim: int, noise: float, seed: int) -> np.ndarray:
    """Unit rows around ``num_ids`` random centres, shuffled (identity structure, no exact ties)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    x = np.repeat(centres, per_id, axis=0) + noise * rng.normal(size=(num_ids * per_id, dim))
    x = x[rng.permutation(len(x))]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def dense_re_ranking(query: np.ndarray, gallery: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al.'s re-ranking on the full (Q+G)² matrix, float64, one point at a time."""
    x = np.concatenate([query, gallery]).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    num_query, n = len(query), len(x)
    sq = (x**2).sum(1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    dist = (dist / dist.max(axis=0)).T  # divide each column by its maximum, then transpose
    rank = np.argsort(dist, axis=1, kind="stable")
    # The float32 implementation keeps these neighbour lists only if no cut-off (k1 + 1, round(k1 / 2) + 1, k2)
    # falls between two distances closer than ~40x float32 rounding: check that the test data is tie-free there.
    ordered = np.take_along_axis(dist, rank, axis=1)
    for cutoff in {k1 + 1, int(np.around(k1 / 2)) + 1, k2}:
        if 0 < cutoff < n:
            gap = (ordered[:, cutoff] - ordered[:, cutoff - 1]).min()
            assert gap > 1e-5, f"test data has a near-tie at neighbour cut-off {cutoff} (gap {gap:.2g})"

    def reciprocal(i: int, k: int) -> list[int]:
        return [j for j in rank[i, :k + 1] if i in rank[j, :k + 1]]

    v = np.zeros((n, n))
    for i in range(n):
        r_i = reciprocal(i, k1)
        expanded = set(r_i)
        for c in r_i:
            r_c = reciprocal(c, int(np.around(k1 / 2)))
            if len(set(r_c) & set(r_i)) > 2 / 3 * len(r_c):
                expanded |= set(r_c)
        members = sorted(expanded)
        weight = np.exp(-dist[i, members])
        v[i, members] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    vq, vg = v[:num_query, None, :], v[None, num_query:, :]
    jaccard = 1 - np.minimum(vq, vg).sum(-1) / np.maximum(vq, vg).sum(-1)
    return (1 - lam) * jaccard + lam * dist[:num_query, num_query:]


def check_against_dense(query, gallery, k1=20, k2=6, lam=0.3, atol=2e-5):
    fast = re_ranking(query, gallery, k1, k2, lam, device="cpu")
    assert fast.dtype == torch.float32 and fast.shape == (len(query), len(gallery))
    np.testing.assert_allclose(fast.numpy(), dense_re_ranking(query, gallery, k1, k2, lam), atol=atol, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_dense_on_identity_structured_data(seed):
    x = identity_features(num_ids=25, per_id=6, dim=24, noise=0.5, seed=seed)
    check_against_dense(x[:30], x[30:])


def test_small_chunks_give_the_same_result():
    x = identity_features(num_ids=20, per_id=5, dim=16, noise=0.5, seed=3)
    whole = re_ranking(x[:25], x[25:], device="cpu")
    chunked = re_ranking(x[:25], x[25:], device="cpu", memory_budget_mb=0.001, max_pairs=50)
    # Only the matmul blocking differs (float rounding), not the maths.
    np.testing.assert_allclose(chunked.numpy(), whole.numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("k1,k2", [(20, 6), (8, 9), (3, 2)])
def test_k1_at_least_set_size_and_k2_above_k1(k1, k2):
    x = identity_features(num_ids=3, per_id=4, dim=8, noise=0.4, seed=4)  # N = 12 <= k1 + 1 for k1 = 20
    check_against_dense(x[:4], x[4:], k1=k1, k2=k2)


def test_k2_equal_one_skips_query_expansion():
    x = identity_features(num_ids=12, per_id=5, dim=16, noise=0.5, seed=5)
    check_against_dense(x[:15], x[15:], k1=10, k2=1)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_lambda_extremes(lam):
    x = identity_features(num_ids=12, per_id=5, dim=16, noise=0.5, seed=6)
    check_against_dense(x[:15], x[15:], k1=10, k2=4, lam=lam)


def test_lambda_one_is_the_row_normalised_original_distance():
    x = identity_features(num_ids=8, per_id=4, dim=8, noise=0.5, seed=7)
    out = re_ranking(x[:6], x[6:], lambda_value=1.0, device="cpu").numpy()
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(out, d[:6, 6:] / d[:6].max(axis=1, keepdims=True), atol=1e-5)


def test_tripled_duplicates():
    # Every feature appears three times; with k1 + 1 = 6, round(k1/2) + 1 = 3 and k2 = 3 no
    # neighbour-list cut-off can split a group of equal distances, so the result is tie-free.
    base = identity_features(num_ids=6, per_id=4, dim=12, noise=0.5, seed=8)
    x = np.repeat(base, 3, axis=0)[np.random.default_rng(0).permutation(3 * len(base))]
    check_against_dense(x[:18], x[18:], k1=5, k2=3)


def test_two_points_and_unnormalised_input():
    rng = np.random.default_rng(9)
    check_against_dense(rng.normal(size=(1, 5)).astype(np.float32), rng.normal(size=(1, 5)).astype(np.float32) * 3)
    q, g = rng.normal(size=(7, 10)).astype(np.float32) * 5, rng.normal(size=(20, 10)).astype(np.float32)
    check_against_dense(q, g, k1=6, k2=3)


def test_identical_features_do_not_divide_by_zero():
    out = re_ranking(np.ones((2, 4), np.float32), np.ones((3, 4), np.float32), device="cpu")
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), 0.0, atol=1e-6)


def test_accepts_torch_tensors():
    x = torch.from_numpy(identity_features(num_ids=6, per_id=4, dim=8, noise=0.5, seed=10))
    out = re_ranking(x[:5], x[5:], k1=6, k2=3, device="cpu")
    np.testing.assert_allclose(out.numpy(), dense_re_ranking(x[:5].numpy(), x[5:].numpy(), 6, 3, 0.3), atol=2e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k1=0), "k1"),
    (dict(k2=-1), "k2"),
    (dict(lambda_value=1.5), "lambda_value"),
])
def test_bad_parameters(kwargs, match):
    x = identity_features(num_ids=3, per_id=3, dim=4, noise=0.3, seed=11)
    with pytest.raises(EvaluationInputError, match=match):
        re_ranking(x[:3], x[3:], **kwargs)


def test_bad_features():
    good = np.ones((3, 4), np.float32)
    with pytest.raises(EvaluationInputError, match="feature dimension"):
        re_ranking(good, np.ones((3, 5), np.float32))
    bad = good.copy()
    bad[1, 2] = np.nan
    with pytest.raises(EvaluationInputError, match="gallery features.*NaN"):
        re_ranking(good, bad)
    with pytest.raises(EvaluationInputError, match="query features.*empty"):
        re_ranking(np.ones((0, 4), np.float32), good)
