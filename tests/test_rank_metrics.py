"""Exactness of the chunked rank metrics and of the visibility-aware part distance.

The fast evaluator is compared with ``reference_rank_metrics``, a slow per-query numpy version
written straight from the Market-1501 protocol (as PASS-reID: PASS_transreid/utils/metrics.py ``eval_func``;
mINP as fast-reid: fastreid/evaluation/rank.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import passreid.eval.rank as rank_module
from passreid.eval import (
    EvaluationInputError,
    FeatureDistance,
    RankResult,
    VisiblePartDistance,
    default_chunk_size,
    pairwise_distance,
    rank_metrics,
    rank_metrics_from_distance,
    visible_part_distance,
)


def reference_rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> dict:
    """One query at a time: stable argsort (ties -> lower gallery index first), drop same-pid-same-cam
    items, skip queries without a positive, CMC truncated to min(max_rank, G), AP over the whole
    kept ranking, INP = #positives / (1 + position of the last positive)."""
    distmat = np.asarray(distmat, dtype=np.float64)
    q_pids, g_pids, q_camids, g_camids = map(np.asarray, (q_pids, g_pids, q_camids, g_camids))
    cmc_length = min(max_rank, distmat.shape[1])
    cmcs, aps, inps = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        removed = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        matches = g_pids[order][~removed] == q_pids[i]
        hits = np.flatnonzero(matches)  # 0-based positions of the positives in the kept ranking
        if len(hits) == 0:
            continue
        cmc = np.zeros(cmc_length)
        cmc[hits[0]:] = 1.0
        cmcs.append(cmc)
        aps.append(np.mean([(k + 1) / (position + 1) for k, position in enumerate(hits)]))
        inps.append(len(hits) / (hits[-1] + 1))
    assert aps, "reference: no valid query"
    return {"cmc": np.mean(cmcs, axis=0), "mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)),
            "num_valid_queries": len(aps)}


def assert_matches_reference(result: RankResult, expected: dict, tol: float = 1e-6) -> None:
    assert result.num_valid_queries == expected["num_valid_queries"]
    assert len(result.cmc) == len(expected["cmc"])
    np.testing.assert_allclose(result.cmc, expected["cmc"], rtol=0, atol=tol)
    assert abs(result.mAP - expected["mAP"]) <= tol
    assert abs(result.mINP - expected["mINP"]) <= tol


# Distances computed in float32 by different matmuls (another chunking of the queries, float64, another
# device) differ by rounding: BLAS blocks a (5, G) product differently from a (17, G) one. Measured: 2.4e-7 on
# unit-vector distances in [0, 4]; 1e-5 is ~40 float32 ulps at 4. Rankings are exact only for a given matrix, so
# the reference ranks the matrix the evaluator saw, and the matrices are compared with this tolerance.
DISTANCE_ROUNDING = 1e-5


def chunked_distances(distance_fn, num_query: int, chunk_size: int) -> np.ndarray:
    """The distance matrix exactly as the evaluator computes it: ``distance_fn`` called chunk by chunk."""
    chunks = [distance_fn(start, min(start + chunk_size, num_query)) for start in range(0, num_query, chunk_size)]
    return torch.cat(chunks).cpu().numpy()


def make_case(seed: int, num_query: int = 40, num_gallery: int = 300, num_ids: int = 25, num_cams: int = 4,
              dim: int = 16, distractors: int = 0, junk: int = 0, duplicates: int = 0, noise: float = 1.2):
    """Features with identity structure (id centre + noise); optional pid-0 distractors, pid -1
    items (kept as ordinary negatives at evaluation time) and duplicated gallery rows (exact ties)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids + 1, dim))

    def split(num, num_special):
        pids = rng.integers(1, num_ids + 1, num)
        pids[:num_special] = 0
        feats = centres[pids] + noise * rng.standard_normal((num, dim))
        return feats.astype(np.float32), pids, rng.integers(0, num_cams, num)

    q_feats, q_pids, q_cams = split(num_query, 0)
    g_feats, g_pids, g_cams = split(num_gallery, distractors)
    g_pids[distractors:distractors + junk] = -1
    if duplicates:
        source = rng.integers(0, num_gallery, duplicates)
        target = rng.integers(0, num_gallery, duplicates)
        g_feats[target] = g_feats[source]
    return q_feats, g_feats, q_pids, g_pids, q_cams, g_cams


@pytest.fixture(params=[None, True, False], ids=["auto-search", "compact-search", "dense-search"])
def search_strategy(request, monkeypatch):
    """Run a test with the automatic choice and with each search strategy forced."""
    monkeypatch.setattr(rank_module, "_FORCE_COMPACT_SEARCH", request.param)
    return request.param


# --------------------------------------------------------------------------------------------
# Known values
# --------------------------------------------------------------------------------------------

def test_hand_computed_example():
    # Query 0 (pid 1, cam 0). Gallery in distance order: same pid+cam (removed), other pid same cam
    # (kept), positive, pid-0 distractor, positive. Kept ranking: [neg, pos, neg, pos].
    # AP = (1/2 + 2/4) / 2 = 0.5, INP = 2/4, first hit at position 1.
    # Query 1 (pid 7, cam 0) has only a same-camera same-pid item: skipped.
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                        [0.5, 0.4, 0.3, 0.2, 0.1, 0.6]])
    g_pids = np.array([1, 2, 1, 0, 1, 7])
    g_cams = np.array([0, 0, 1, 3, 2, 0])
    result = rank_metrics_from_distance(distmat, [1, 7], g_pids, [0, 0], g_cams, device="cpu")
    assert result.num_valid_queries == 1 and result.num_queries == 2
    np.testing.assert_array_equal(result.cmc, [0, 1, 1, 1, 1, 1])  # G=6 < max_rank: 6 entries
    assert result.mAP == pytest.approx(0.5) and result.mINP == pytest.approx(0.5)
    assert np.isnan(result.query_ap[1]) and result.query_ap[0] == pytest.approx(0.5)


def test_same_camera_other_identity_is_kept_as_negative():
    # The only item closer than the positive is another identity from the query's camera.
    result = rank_metrics_from_distance(np.array([[0.1, 0.2]]), [5], [6, 5], [2], [2, 3], device="cpu")
    assert result.rank(1) == 0.0 and result.rank(2) == 1.0 and result.mAP == pytest.approx(0.5)


def test_same_identity_same_camera_is_removed():
    # The same-id same-camera item ranks first but is removed: the positive becomes rank 1.
    result = rank_metrics_from_distance(np.array([[0.1, 0.2]]), [5], [5, 5], [2], [2, 3], device="cpu")
    assert result.rank(1) == 1.0 and result.mAP == 1.0 and result.mINP == 1.0


@pytest.mark.parametrize("order, expected_ap", [((0, 1), 0.5), ((1, 0), 1.0)])
def test_tie_rule_stable_by_gallery_index(order, expected_ap):
    # Equal distances: the lower gallery index ranks first (positive at index order[1]).
    g_pids = np.array([9, 9])
    g_pids[order[1]] = 1
    result = rank_metrics_from_distance(np.array([[0.5, 0.5]]), [1], g_pids, [0], [1, 1], device="cpu")
    assert result.mAP == pytest.approx(expected_ap)


def test_negative_zero_ties_with_zero():
    # -0.0 == 0.0, so the tie rule (gallery index) decides, as in a stable sort.
    result = rank_metrics_from_distance(np.array([[0.0, -0.0]]), [1], [9, 1], [0], [1, 1], device="cpu")
    assert result.mAP == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# Fast evaluator == reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("case", [
    dict(),
    dict(distractors=80, junk=20),
    dict(duplicates=60, num_ids=8),
    dict(num_query=13, num_gallery=9, num_ids=3),  # gallery smaller than max_rank
    dict(noise=4.0),  # hard: most negatives rank before the last positive
])
def test_feature_metrics_match_reference(seed, case, search_strategy):
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = make_case(seed, **case)
    seen = chunked_distances(FeatureDistance(q_feats, g_feats, device="cpu"), len(q_pids), 7)
    distmat = pairwise_distance(q_feats, g_feats, device="cpu").numpy()
    np.testing.assert_allclose(seen, distmat, rtol=0, atol=DISTANCE_ROUNDING)
    result = rank_metrics(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams, chunk_size=7, device="cpu")
    assert_matches_reference(result, reference_rank_metrics(seen, q_pids, g_pids, q_cams, g_cams))
    from_matrix = rank_metrics_from_distance(distmat, q_pids, g_pids, q_cams, g_cams, chunk_size=7, device="cpu")
    assert_matches_reference(from_matrix, reference_rank_metrics(distmat, q_pids, g_pids, q_cams, g_cams))


@pytest.mark.parametrize("seed", range(6))
def test_many_ties_match_reference(seed, search_strategy):
    # Small integer distances: most rows are full of ties, including ties between positives and
    # negatives, resolved by gallery index.
    rng = np.random.default_rng(seed)
    num_query, num_gallery = 30, 70
    distmat = rng.integers(0, 4, (num_query, num_gallery)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, 6, num_query), rng.integers(0, 6, num_gallery)
    q_cams, g_cams = rng.integers(0, 3, num_query), rng.integers(0, 3, num_gallery)
    expected = reference_rank_metrics(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    result = rank_metrics_from_distance(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20,
                                        chunk_size=int(rng.integers(1, num_query + 1)), device="cpu")
    assert_matches_reference(result, expected)


def test_float64_distances_are_not_rounded(search_strategy):
    # Two distances that differ only beyond float32 precision must keep their order.
    distmat = np.array([[1.0 + 1e-12, 1.0]])
    result = rank_metrics_from_distance(distmat, [1], [1, 2], [0], [1, 1], device="cpu")
    assert result.mAP == pytest.approx(0.5)


@pytest.mark.parametrize("chunk_size", ["1", "7", "Q-1", "Q", "Q+5"])
def test_chunk_boundaries_give_identical_results(chunk_size):
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = make_case(3, num_query=23, distractors=30, duplicates=20)
    distmat = pairwise_distance(q_feats, g_feats, device="cpu")
    num_query = len(q_pids)
    size = eval(chunk_size, {"Q": num_query})  # noqa: S307 - literal parameter names above
    whole = rank_metrics_from_distance(distmat, q_pids, g_pids, q_cams, g_cams, chunk_size=num_query, device="cpu")
    chunked = rank_metrics_from_distance(distmat, q_pids, g_pids, q_cams, g_cams, chunk_size=size, device="cpu")
    # Same distances -> bit-identical metrics, whatever the chunking.
    np.testing.assert_array_equal(chunked.cmc, whole.cmc)
    assert (chunked.mAP, chunked.mINP, chunked.num_valid_queries) == (whole.mAP, whole.mINP, whole.num_valid_queries)
    assert_matches_reference(chunked, reference_rank_metrics(distmat, q_pids, g_pids, q_cams, g_cams))


def test_queries_without_positives_are_skipped():
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = make_case(5, num_query=30, num_ids=10)
    q_pids = q_pids.copy()
    q_pids[:6] = 999  # no such identity in the gallery
    g_pids, g_cams = g_pids.copy(), g_cams.copy()
    g_pids[:5], g_cams[:5] = 555, 3
    q_pids[6:9], q_cams[6:9] = 555, 3  # only same-camera matches: removed, so skipped too
    result = rank_metrics(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams, device="cpu")
    distmat = pairwise_distance(q_feats, g_feats, device="cpu").numpy()
    expected = reference_rank_metrics(distmat, q_pids, g_pids, q_cams, g_cams)
    assert expected["num_valid_queries"] == 30 - 9
    assert_matches_reference(result, expected)
    assert np.isnan(result.query_ap[:9]).all() and not np.isnan(result.query_ap[9:]).any()


def test_all_queries_skipped_raises():
    with pytest.raises(EvaluationInputError, match="no valid query"):
        rank_metrics_from_distance(np.zeros((2, 3)), [1, 2], [1, 2, 3], [0, 0], [0, 0, 1], device="cpu")


@pytest.mark.parametrize("max_rank, num_gallery, expected_length", [(50, 9, 9), (5, 40, 5), (1, 40, 1)])
def test_cmc_length_is_min_of_max_rank_and_gallery(max_rank, num_gallery, expected_length):
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = make_case(1, num_query=10, num_gallery=num_gallery, num_ids=3)
    result = rank_metrics(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank, device="cpu")
    assert len(result.cmc) == expected_length == len(result.to_dict()["cmc"])
    distmat = pairwise_distance(q_feats, g_feats, device="cpu").numpy()
    assert_matches_reference(result, reference_rank_metrics(distmat, q_pids, g_pids, q_cams, g_cams, max_rank))


def test_cosine_ranks_like_normalised_euclidean():
    case = make_case(7, distractors=40)
    euclidean = rank_metrics(*case, metric="euclidean", device="cpu")
    cosine = rank_metrics(*case, metric="cosine", device="cpu")
    np.testing.assert_allclose(cosine.cmc, euclidean.cmc, atol=1e-6)
    assert cosine.mAP == pytest.approx(euclidean.mAP, abs=1e-6)
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = case
    q_unit = q_feats / np.linalg.norm(q_feats, axis=1, keepdims=True)
    g_unit = g_feats / np.linalg.norm(g_feats, axis=1, keepdims=True)
    seen = chunked_distances(FeatureDistance(q_feats, g_feats, metric="cosine", device="cpu"), len(q_pids),
                             cosine.chunk_size)
    np.testing.assert_allclose(seen, 1 - q_unit @ g_unit.T, rtol=0, atol=DISTANCE_ROUNDING)
    assert_matches_reference(cosine, reference_rank_metrics(seen, q_pids, g_pids, q_cams, g_cams))


def test_raw_euclidean_without_normalisation():
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = make_case(8)
    g_feats = g_feats * np.random.default_rng(0).uniform(0.2, 5.0, (len(g_feats), 1)).astype(np.float32)
    raw = ((q_feats[:, None, :].astype(np.float64) - g_feats[None, :, :]) ** 2).sum(-1)
    result = rank_metrics(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams, normalize=False, device="cpu")
    seen = chunked_distances(FeatureDistance(q_feats, g_feats, normalize=False, device="cpu"), len(q_pids),
                             result.chunk_size)
    np.testing.assert_allclose(seen, raw, rtol=DISTANCE_ROUNDING, atol=DISTANCE_ROUNDING)  # raw: up to ~100
    assert_matches_reference(result, reference_rank_metrics(seen, q_pids, g_pids, q_cams, g_cams))
    normalised = rank_metrics(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams, device="cpu")
    assert normalised.mAP != pytest.approx(result.mAP)  # the scaling matters only without normalisation


def test_pairwise_distance_values():
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((5, 8)), rng.standard_normal((7, 8))
    q_unit = q / np.linalg.norm(q, axis=1, keepdims=True)
    g_unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    plain = np.linalg.norm(q_unit[:, None] - g_unit[None], axis=-1)
    np.testing.assert_allclose(pairwise_distance(q, g, squared=False).numpy(), plain, atol=1e-5)
    np.testing.assert_allclose(pairwise_distance(q, g).numpy(), plain**2, atol=1e-5)
    np.testing.assert_allclose(pairwise_distance(q, g, metric="cosine").numpy(), 1 - q_unit @ g_unit.T, atol=1e-6)
    raw = np.linalg.norm(q[:, None] - g[None], axis=-1)
    np.testing.assert_allclose(pairwise_distance(q, g, normalize=False, squared=False).numpy(), raw, atol=1e-5)
    fn = FeatureDistance(q, g, device="cpu")
    np.testing.assert_allclose(chunked_distances(fn, 5, 2), fn(0, 5).numpy(), rtol=0, atol=DISTANCE_ROUNDING)


def test_inputs_as_lists_tensors_and_unsigned_ids():
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = make_case(2)
    expected = rank_metrics(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams, device="cpu")
    as_lists = rank_metrics(torch.from_numpy(q_feats), torch.from_numpy(g_feats).double(), q_pids.tolist(),
                            torch.from_numpy(g_pids), q_cams.astype(np.uint8), list(g_cams), device="cpu")
    assert as_lists.mAP == pytest.approx(expected.mAP, abs=1e-6)
    np.testing.assert_allclose(as_lists.cmc, expected.cmc)


def test_deterministic():
    case = make_case(4, duplicates=30, distractors=20)
    first = rank_metrics(*case, chunk_size=5, device="cpu")
    second = rank_metrics(*case, chunk_size=5, device="cpu")
    np.testing.assert_array_equal(first.cmc, second.cmc)
    np.testing.assert_array_equal(first.query_ap, second.query_ap)
    assert (first.mAP, first.mINP) == (second.mAP, second.mINP)


@pytest.mark.cuda  # skipped without CUDA (tests/conftest.py)
def test_cuda_matches_cpu():
    case = make_case(6, distractors=50, duplicates=20)
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = case
    seen = {}
    for device in ("cpu", "cuda"):
        result = rank_metrics(*case, chunk_size=9, device=device)
        seen[device] = chunked_distances(FeatureDistance(q_feats, g_feats, device=device), len(q_pids), 9)
        # Exact for the matrix each device computed; the devices round differently (near-ties may swap).
        assert_matches_reference(result, reference_rank_metrics(seen[device], q_pids, g_pids, q_cams, g_cams))
    np.testing.assert_allclose(seen["cuda"], seen["cpu"], rtol=0, atol=DISTANCE_ROUNDING)


# --------------------------------------------------------------------------------------------
# Chunking and memory budget
# --------------------------------------------------------------------------------------------

def test_distance_function_is_called_in_bounded_contiguous_chunks():
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = make_case(0, num_query=25)
    full = pairwise_distance(q_feats, g_feats, device="cpu")
    calls = []

    def distance_fn(start, end):
        calls.append((start, end))
        return full[start:end]

    result = rank_metrics_from_distance(distance_fn, q_pids, g_pids, q_cams, g_cams, chunk_size=6, device="cpu")
    assert calls == [(0, 6), (6, 12), (12, 18), (18, 24), (24, 25)]
    assert_matches_reference(result, reference_rank_metrics(full, q_pids, g_pids, q_cams, g_cams))


def test_default_chunk_size_follows_memory_budget():
    assert default_chunk_size(82161, 256) * 82161 * 40 <= 256 * 2**20
    assert default_chunk_size(1000, 256) > default_chunk_size(1000, 16) >= 1
    assert default_chunk_size(10**9, 1) == 1
    case = make_case(0, num_gallery=300)
    result = rank_metrics(*case, memory_budget_mb=0.1, device="cpu")
    assert result.chunk_size == default_chunk_size(300, 0.1)
    with pytest.raises(EvaluationInputError, match="memory_budget_mb"):
        default_chunk_size(10, 0)


def test_result_helpers():
    result = rank_metrics(*make_case(0), max_rank=10, device="cpu")
    data = result.to_dict()
    assert set(data) == {"mAP", "mINP", "cmc", "num_valid_queries", "num_queries", "num_gallery"}
    assert result.rank(1) == data["cmc"][0] and result.rank(10) == data["cmc"][9]
    with pytest.raises(ValueError, match="outside"):
        result.rank(11)
    table = result.format_table()
    assert "Rank-1" in table and "Rank-10" in table and "mINP" in table
    assert f"{100 * result.mAP:.2f}" in table


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def _good_case():
    return list(make_case(0, num_query=6, num_gallery=20, num_ids=4))


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.__setitem__(2, c[2][:-1]), "query pids has 5 entries but query features has 6"),
    (lambda c: c.__setitem__(3, c[3][:-2]), "gallery pids has 18 entries but gallery features has 20"),
    (lambda c: c.__setitem__(4, c[4][:-1]), "query camids has 5 entries but query pids has 6"),
    (lambda c: c[0].__setitem__((1, 2), np.nan), "query features: contains 1 non-finite value.*NaN"),
    (lambda c: c[1].__setitem__((3, 0), np.inf), "gallery features: contains 1 non-finite value.*Inf"),
    (lambda c: c.__setitem__(0, c[0][:0]), "query features: feature matrix is empty"),
    (lambda c: c.__setitem__(1, c[1][:, :5]), "feature dimension differs"),
    (lambda c: c.__setitem__(2, c[2].astype(np.float64)), "query pids: expected integer ids, got dtype float64"),
    (lambda c: c.__setitem__(5, c[5] > 0), "gallery camids: expected integer ids, got dtype bool"),
    (lambda c: c.__setitem__(0, c[0].astype(np.int64)), "query features: expected floating-point"),
    (lambda c: c.__setitem__(0, c[0][None]), "expected a 2-D"),
])
def test_bad_feature_input_is_rejected(mutate, message):
    case = _good_case()
    mutate(case)
    with pytest.raises(EvaluationInputError, match=message):
        rank_metrics(*case, device="cpu")


@pytest.mark.parametrize("options, message", [
    (dict(metric="manhattan"), "unknown metric"),
    (dict(max_rank=0), "max_rank must be a positive integer"),
    (dict(chunk_size=0), "chunk_size must be a positive integer"),
])
def test_bad_options_are_rejected(options, message):
    with pytest.raises(EvaluationInputError, match=message):
        rank_metrics(*_good_case(), device="cpu", **options)


def test_bad_distance_input_is_rejected():
    ids = ([1, 2], [1, 2, 1], [0, 0], [1, 1, 0])
    assert issubclass(EvaluationInputError, ValueError)
    with pytest.raises(EvaluationInputError, match=r"shape \(3, 3\), expected .* \(2, 3\)"):
        rank_metrics_from_distance(np.zeros((3, 3)), *ids, device="cpu")
    with pytest.raises(EvaluationInputError, match="rows 0:2: contains NaN or Inf"):
        rank_metrics_from_distance(np.array([[0.0, np.nan, 1.0], [0.0, 1.0, 2.0]]), *ids, device="cpu")
    with pytest.raises(EvaluationInputError, match=r"rows 0:1: expected shape \(1, 3\), got \(1, 2\)"):
        rank_metrics_from_distance(lambda s, e: torch.zeros(e - s, 2), *ids, chunk_size=1, device="cpu")
    with pytest.raises(EvaluationInputError, match="expected a floating-point tensor"):
        rank_metrics_from_distance(np.zeros((2, 3), dtype=np.int64), *ids, device="cpu")
    with pytest.raises(EvaluationInputError, match="query pids: empty"):
        rank_metrics_from_distance(np.zeros((0, 3)), [], [1, 2, 1], [], [1, 1, 0], device="cpu")
    with pytest.raises(EvaluationInputError, match="callable"):
        rank_metrics_from_distance("distances.npy", *ids, device="cpu")


# --------------------------------------------------------------------------------------------
# Visibility-aware part distance
# --------------------------------------------------------------------------------------------

def brute_force_part_distance(q_parts, q_vis, g_parts, g_vis, mode, threshold=0.5, no_overlap=3.0):
    """Loop over every (query, gallery, part): masked mean of plain per-part L2 distances of the
    normalised parts; weight v_q*v_g (binarised) or sqrt(v_q*v_g) (weighted)."""
    q_parts = q_parts / np.linalg.norm(q_parts, axis=2, keepdims=True)
    g_parts = g_parts / np.linalg.norm(g_parts, axis=2, keepdims=True)
    out = np.zeros((len(q_parts), len(g_parts)))
    for i in range(len(q_parts)):
        for j in range(len(g_parts)):
            total = weight_sum = 0.0
            for k in range(q_parts.shape[1]):
                if mode == "binary":
                    weight = float(q_vis[i, k] >= threshold) * float(g_vis[j, k] >= threshold)
                else:
                    weight = np.sqrt(q_vis[i, k] * g_vis[j, k])
                total += weight * np.linalg.norm(q_parts[i, k] - g_parts[j, k])
                weight_sum += weight
            out[i, j] = total / weight_sum if weight_sum > 0 else no_overlap
    return out


def make_parts(seed, num_query=9, num_gallery=14, num_parts=4, dim=6):
    rng = np.random.default_rng(seed)
    q_parts = rng.standard_normal((num_query, num_parts, dim)).astype(np.float32)
    g_parts = rng.standard_normal((num_gallery, num_parts, dim)).astype(np.float32)
    q_vis = rng.uniform(0, 1, (num_query, num_parts)).astype(np.float32)
    g_vis = rng.uniform(0, 1, (num_gallery, num_parts)).astype(np.float32)
    q_vis[0] = 0.0  # a query with no visible part at all
    g_vis[1, :] = [1.0, 0.0, 0.0, 0.0]
    return q_parts, q_vis, g_parts, g_vis


@pytest.mark.parametrize("mode", ["binary", "weighted"])
@pytest.mark.parametrize("seed", range(2))
def test_visible_part_distance_matches_brute_force(mode, seed):
    q_parts, q_vis, g_parts, g_vis = make_parts(seed)
    fast = visible_part_distance(q_parts, q_vis, g_parts, g_vis, visibility=mode, device="cpu").numpy()
    slow = brute_force_part_distance(q_parts, q_vis, g_parts, g_vis, mode)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
    no_overlap = slow == 3.0
    assert no_overlap[0].all() and no_overlap.sum() < no_overlap.size  # query 0 sees no part
    assert (fast[~no_overlap] < 3.0).all()  # no-overlap pairs rank after every real distance


def test_visible_part_distance_threshold_always_visible_and_raw_bound():
    q_parts, q_vis, g_parts, g_vis = make_parts(3)
    strict = visible_part_distance(q_parts, q_vis, g_parts, g_vis, threshold=0.8, device="cpu").numpy()
    np.testing.assert_allclose(strict, brute_force_part_distance(q_parts, q_vis, g_parts, g_vis, "binary", 0.8),
                               rtol=1e-5, atol=1e-5)
    forced = visible_part_distance(q_parts, q_vis, g_parts, g_vis, always_visible=[0], device="cpu").numpy()
    q_forced, g_forced = q_vis.copy(), g_vis.copy()
    q_forced[:, 0] = g_forced[:, 0] = 1.0
    np.testing.assert_allclose(forced, brute_force_part_distance(q_parts, q_forced, g_parts, g_forced, "binary"),
                               rtol=1e-5, atol=1e-5)
    assert (forced < 3.0).all()  # part 0 is always shared
    raw = VisiblePartDistance(q_parts * 10, q_vis, g_parts, g_vis, normalize=False, device="cpu")
    bound = np.linalg.norm(q_parts * 10, axis=2).max() + np.linalg.norm(g_parts, axis=2).max() + 1
    assert raw.no_overlap_distance == pytest.approx(bound, rel=1e-5)
    assert (raw(0, 1).numpy() == raw.no_overlap_distance).all()


def test_visible_part_distance_is_chunkable_and_evaluable():
    q_parts, q_vis, g_parts, g_vis = make_parts(4, num_query=17, num_gallery=30)
    fn = VisiblePartDistance(q_parts, q_vis, g_parts, g_vis, visibility="weighted", device="cpu")
    full = fn(0, 17)
    np.testing.assert_allclose(torch.cat([fn(0, 5), fn(5, 11), fn(11, 17)]).numpy(), full.numpy(), rtol=0,
                               atol=DISTANCE_ROUNDING)
    rng = np.random.default_rng(4)
    q_pids, g_pids = rng.integers(0, 4, 17), rng.integers(0, 4, 30)
    q_cams, g_cams = rng.integers(0, 2, 17), rng.integers(0, 2, 30)
    result = rank_metrics_from_distance(fn, q_pids, g_pids, q_cams, g_cams, chunk_size=4, device="cpu")
    seen = chunked_distances(fn, 17, 4)
    assert_matches_reference(result, reference_rank_metrics(seen, q_pids, g_pids, q_cams, g_cams))


@pytest.mark.parametrize("change, message", [
    (lambda a: a.__setitem__(1, a[1][:, :3]), r"query visibility: expected shape \(9, 4\)"),
    (lambda a: a[3].__setitem__((0, 0), -0.5), "visibility scores must be >= 0"),
    (lambda a: a.__setitem__(2, a[2][:, :, :5]), "part features differ"),
    (lambda a: a.__setitem__(0, a[0][:, 0]), r"expected an \(N, K, D\) array"),
    (lambda a: a[0].__setitem__((0, 0, 0), np.nan), "query part features: contains 1 non-finite"),
])
def test_visible_part_distance_bad_input(change, message):
    arrays = list(make_parts(0))
    change(arrays)
    with pytest.raises(EvaluationInputError, match=message):
        visible_part_distance(*arrays, device="cpu")


def test_visible_part_distance_bad_options():
    arrays = make_parts(0)
    with pytest.raises(EvaluationInputError, match="must lie in"):
        visible_part_distance(arrays[0], arrays[1] * 2, arrays[2], arrays[3], visibility="weighted", device="cpu")
    with pytest.raises(EvaluationInputError, match="unknown visibility mode"):
        visible_part_distance(*arrays, visibility="soft", device="cpu")
    with pytest.raises(EvaluationInputError, match="always_visible index 4 is out of range"):
        visible_part_distance(*arrays, always_visible=[4], device="cpu")
