"""Sparse Cluster-Contrast Jaccard distance and sparse DBSCAN against dense versions from the formulas."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.cluster import DBSCAN

from passreid.cluster import dbscan_from_graph, dbscan_pseudo_labels, jaccard_sparse, knn, knn_with_farthest
from passreid.cluster.kreciprocal import half_neighbourhood
from passreid.eval.distance import EvaluationInputError


def identity_features(num_ids: int, per_id: int, dim: int, noise: float, seed: int) -> np.ndarray:
    """Unit rows around ``num_ids`` random centres, shuffled (identity structure, no exact ties)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    x = np.repeat(centres, per_id, axis=0) + noise * rng.normal(size=(num_ids * per_id, dim))
    x = x[rng.permutation(len(x))]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def dense_jaccard(x: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """Cluster-Contrast's compute_jaccard_distance on the full N x N matrix, float64, point by point.

    Only ``k1`` neighbours are searched (self included), weights use ``2 - 2 x_i.x_j``, and the
    Jaccard distance is ``1 - sum(min) / sum(max)``.
    """
    x = x.astype(np.float64)
    n = len(x)
    sq = (x**2).sum(1)
    rank = np.argsort(sq[:, None] + sq[None, :] - 2 * x @ x.T, axis=1, kind="stable")[:, :k1]

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
        logits = -(2 - 2 * x[members] @ x[i])
        weight = np.exp(logits - logits.max())
        v[i, members] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = 1 - np.minimum(v[:, None], v[None]).sum(-1) / np.maximum(v[:, None], v[None]).sum(-1)
    return np.maximum(jaccard, 0.0)


def as_dense(graph: sp.csr_matrix) -> np.ndarray:
    """Absent entries of the sparse Jaccard matrix are distance 1."""
    dense = np.ones(graph.shape)
    coo = graph.tocoo()
    dense[coo.row, coo.col] = coo.data
    return dense


def canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters by order of first appearance (outliers stay -1) to compare partitions."""
    mapping: dict[int, int] = {}
    return np.array([-1 if lab == -1 else mapping.setdefault(lab, len(mapping)) for lab in labels])


def sklearn_labels(dense: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dense)


def assert_away_from(values: np.ndarray, eps: float, margin: float = 1e-5) -> None:
    """The float32 vs float64 comparison is meaningful only without distances within ``margin`` of eps."""
    assert np.abs(values - eps).min() > margin, "test data has a distance too close to eps"


def assert_tie_free_cutoffs(x: np.ndarray, k1: int, k2: int, margin: float = 1e-5) -> None:
    """The float32 kernel and the float64 reference keep the same neighbour lists only if no list cut-off (k1,
    round(k1 / 2) + 1, k2) falls between two distances closer than ``margin``: ~40x the float32 rounding of a
    unit-vector distance in [0, 4]. Cut-offs between exact duplicates are ruled out by this check too."""
    x64 = x.astype(np.float64)
    squared = (x64**2).sum(1)
    ordered = np.sort(squared[:, None] + squared[None] - 2 * x64 @ x64.T, axis=1)
    for cutoff in {k1, half_neighbourhood(k1) + 1, k2}:
        if 0 < cutoff < len(x):
            gap = (ordered[:, cutoff] - ordered[:, cutoff - 1]).min()
            assert gap > margin, f"test data has a near-tie at neighbour cut-off {cutoff} (gap {gap:.2g})"


# --- kNN ----------------------------------------------------------------------------------------

# The kNN kernels compute distances in float32 with blocked matmuls, whose rounding depends on the blocking,
# the BLAS kernel and the thread count; two neighbours closer than this (relative to the distance scale) may
# come back in either order, as the kNN module's "Ties" note says. float32 matmul error here: ~1e-6 relative.
KNN_TIE_TOLERANCE = 1e-4


def assert_exact_neighbours(dist, idx, x: np.ndarray, k: int, metric: str = "sqeuclidean") -> None:
    """``idx`` holds every row's ``k`` nearest rows (self included), nearest first, up to ties: the returned
    distances are the true ``k`` smallest ones, and a row is left out only if it ties the k-th (within
    ``KNN_TIE_TOLERANCE``) with a returned one; ``dist`` are the true distances of the returned rows.
    ``metric="inner_product"``: largest inner products first (compared as distances ``-x_i.x_j``)."""
    x64 = x.astype(np.float64)
    idx, dist = np.asarray(idx), np.asarray(dist)
    if metric == "inner_product":
        exact, dist = -x64 @ x64.T, -dist
    else:
        exact = ((x64[:, None] - x64[None]) ** 2).sum(-1)
    assert idx.shape == (len(x), k) and all(len(set(row)) == k for row in idx), "k distinct neighbours per row"
    returned = np.take_along_axis(exact, idx, axis=1)
    np.testing.assert_allclose(dist, returned, atol=KNN_TIE_TOLERANCE)
    np.testing.assert_allclose(returned, np.sort(exact, axis=1)[:, :k], atol=KNN_TIE_TOLERANCE)
    assert (np.diff(returned, axis=1) > -KNN_TIE_TOLERANCE).all(), "nearest first (up to ties)"


@pytest.mark.parametrize("metric", ["sqeuclidean", "inner_product"])
def test_faiss_and_torch_knn_agree(metric):
    pytest.importorskip("faiss")
    x = np.random.default_rng(0).normal(size=(300, 20)).astype(np.float32)
    d_torch, i_torch = knn(x, 12, backend="torch", metric=metric, device="cpu")
    d_faiss, i_faiss = knn(x, 12, backend="faiss", metric=metric)
    # Both exact; the order of (near-)tied neighbours is unspecified in either backend.
    assert_exact_neighbours(d_torch, i_torch, x, 12, metric)
    assert_exact_neighbours(d_faiss, i_faiss, x, 12, metric)
    torch.testing.assert_close(d_torch, d_faiss, rtol=1e-5, atol=1e-4)


def test_knn_matches_brute_force_and_chunking():
    x = np.random.default_rng(1).normal(size=(200, 8)).astype(np.float32)
    dist, idx = knn(x, 7, backend="torch", device="cpu", memory_budget_mb=0.01)  # many tiny chunks
    assert_exact_neighbours(dist, idx, x, 7)
    assert knn(x[:5], 50, backend="torch")[1].shape == (5, 5)  # k is capped at N


def test_knn_with_farthest_matches_brute_force_with_a_one_row_last_block():
    x = np.random.default_rng(2).normal(size=(100, 6)).astype(np.float32)
    exact = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    # A 0.001 MiB budget gives 9-row blocks: 100 = 11 x 9 + 1, so the last block has one row.
    dist, idx, farthest = knn_with_farthest(x, 21, device="cpu", memory_budget_mb=0.001)
    assert_exact_neighbours(dist, idx, x, 21)
    np.testing.assert_allclose(farthest.numpy(), exact.max(axis=1), atol=KNN_TIE_TOLERANCE)


def test_knn_bad_input():
    with pytest.raises(EvaluationInputError, match="backend"):
        knn(np.ones((3, 2), np.float32), 2, backend="annoy")
    with pytest.raises(EvaluationInputError, match="k must be"):
        knn(np.ones((3, 2), np.float32), 0)


# --- Jaccard ------------------------------------------------------------------------------------

@pytest.mark.parametrize("k1,k2", [(30, 6), (20, 6), (7, 1), (5, 9)])
def test_jaccard_matches_dense(k1, k2):
    x = identity_features(num_ids=20, per_id=8, dim=24, noise=0.6, seed=k1)
    assert_tie_free_cutoffs(x, k1, k2)
    graph = jaccard_sparse(x, k1, k2, normalize=False, device="cpu")
    reference = dense_jaccard(x, k1, k2)
    np.testing.assert_allclose(as_dense(graph), reference, atol=1e-5, rtol=0)
    # Stored = exactly the pairs below 1; explicit zeros on the diagonal; symmetric; sorted CSR.
    assert graph.dtype == np.float32 and graph.has_sorted_indices
    assert np.all(graph.data < 1.0)
    assert (graph.diagonal() == 0).all() and graph.tocoo().row[graph.tocoo().data == 0].size >= len(x)
    assert np.count_nonzero(reference < 1 - 1e-5) <= graph.nnz <= np.count_nonzero(reference < 1)
    assert abs(graph - graph.T).max() == 0


def test_jaccard_small_scratch_and_threshold():
    x = identity_features(num_ids=10, per_id=6, dim=16, noise=0.5, seed=2)
    full = jaccard_sparse(x, 10, 4)
    tiny = jaccard_sparse(x, 10, 4, max_pairs=7)
    np.testing.assert_array_equal(as_dense(tiny), as_dense(full))
    cut = jaccard_sparse(x, 10, 4, max_distance=0.5)
    assert np.all(cut.data <= 0.5)
    kept = full.copy()
    kept.data[kept.data > 0.5] = 1.0
    np.testing.assert_array_equal(as_dense(cut), as_dense(kept))


def test_jaccard_with_duplicates_and_tiny_sets():
    # Every row appears three times. With k1 = 15 (lists of 15), round(15/2) + 1 = 9 and k2 = 6 every
    # list cut-off is a multiple of 3, so no cut-off splits a group of equal distances: tie-free.
    base = identity_features(num_ids=8, per_id=3, dim=12, noise=0.5, seed=3)
    x = np.repeat(base, 3, axis=0)
    assert_tie_free_cutoffs(x, 15, 6)
    graph = jaccard_sparse(x, 15, 6, normalize=False)
    np.testing.assert_allclose(as_dense(graph), dense_jaccard(x, 15, 6), atol=1e-5)
    # Fewer points than k1.
    small = identity_features(num_ids=2, per_id=3, dim=6, noise=0.3, seed=4)
    np.testing.assert_allclose(as_dense(jaccard_sparse(small, 30, 6, normalize=False)),
                               dense_jaccard(small, 30, 6), atol=1e-5)
    single = jaccard_sparse(small[:1], 30, 6)
    assert single.shape == (1, 1) and single.nnz == 1 and single[0, 0] == 0


def test_a_row_with_an_empty_encoding_keeps_an_explicit_zero_diagonal():
    # Degenerate input (possible only when more than k1 duplicates crowd a point out of its own
    # neighbour list): the empty row overlaps nothing; its self-distance is still stored as 0.
    from passreid.cluster.jaccard import _pairwise_jaccard

    encodings = np.array([[0.5, 0.5, 0, 0], [0.25, 0.75, 0, 0], [0, 0, 0, 0], [0, 0, 0.4, 0.6]], np.float32)
    graph = _pairwise_jaccard(sp.csr_matrix(encodings), None, max_pairs=1000)
    expected = np.ones((4, 4))
    np.fill_diagonal(expected, 0.0)
    expected[0, 1] = expected[1, 0] = 1 - (0.25 + 0.5) / (0.5 + 0.75)
    np.testing.assert_allclose(as_dense(graph), expected, atol=1e-6)
    assert graph.nnz == 6 and graph[2, 2] == 0 and graph.has_sorted_indices


def test_jaccard_normalisation():
    x = identity_features(num_ids=6, per_id=5, dim=8, noise=0.4, seed=5)
    scaled = x * np.random.default_rng(0).uniform(0.5, 3.0, size=(len(x), 1)).astype(np.float32)
    np.testing.assert_allclose(as_dense(jaccard_sparse(scaled, 10, 3)), as_dense(jaccard_sparse(x, 10, 3)), atol=1e-6)
    with pytest.raises(EvaluationInputError, match="L2-normalised"):
        jaccard_sparse(scaled, 10, 3, normalize=False)


def test_jaccard_of_raw_rows_is_the_published_formula():
    """``require_unit=False``: rows of any norm go in as they are, as the published code feeds the multi-neck
    UDA feature (norms in [1, sqrt 2] for ``cat``): ranked by true L2, weighted with ``2 - 2 x_i.x_j``."""
    x = identity_features(num_ids=20, per_id=8, dim=24, noise=0.6, seed=3)
    x = x * np.random.default_rng(1).uniform(1.0, 2 ** 0.5, size=(len(x), 1)).astype(np.float32)
    raw = as_dense(jaccard_sparse(x, 30, 6, normalize=False, require_unit=False, device="cpu"))
    np.testing.assert_allclose(raw, dense_jaccard(x, 30, 6), atol=1e-5, rtol=0)  # float32 vs float64 rounding
    normalised = as_dense(jaccard_sparse(x, 30, 6, device="cpu"))
    assert np.abs(raw - normalised).max() > 0.05  # the norms change the distances: the switch matters


def test_half_neighbourhood_rounds_half_to_even():
    assert [half_neighbourhood(k) for k in (30, 20, 5, 7, 1)] == [15, 10, 2, 4, 0]


# --- DBSCAN -------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,eps", [(0, 0.6), (1, 0.6), (2, 0.7), (3, 0.45)])
def test_dbscan_partition_matches_sklearn_on_dense(seed, eps):
    # Identities plus scattered points that should end up as outliers.
    scattered = identity_features(num_ids=15, per_id=1, dim=32, noise=0.0, seed=100 + seed)
    x = np.concatenate([identity_features(num_ids=25, per_id=7, dim=32, noise=0.7, seed=seed), scattered])
    assert_tie_free_cutoffs(x, 30, 6)
    reference = dense_jaccard(x, 30, 6)
    assert_away_from(reference, eps)
    expected = sklearn_labels(reference, eps, 4)
    assert len(set(expected) - {-1}) > 5  # a non-trivial partition,
    assert (expected == -1).any() or eps > 0.6  # with outliers at the stricter eps
    got = dbscan_pseudo_labels(x, eps=eps, min_samples=4, normalize=False)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(canonical(got), canonical(expected))


def test_dbscan_all_outliers_and_one_cluster():
    x = identity_features(num_ids=15, per_id=5, dim=16, noise=0.6, seed=6)
    assert_tie_free_cutoffs(x, 30, 6)
    assert_tie_free_cutoffs(x, 30, 1)
    reference = dense_jaccard(x, 30, 6)
    # All outliers: no point has min_samples neighbours. (A tiny eps is not enough with query
    # expansion: points sharing their top-k2 list have identical encodings, Jaccard exactly 0.)
    assert (sklearn_labels(reference, 0.5, len(x) + 1) == -1).all()
    assert (dbscan_pseudo_labels(x, eps=0.5, min_samples=len(x) + 1) == -1).all()
    no_expansion = dense_jaccard(x, 30, 1)
    assert_away_from(no_expansion, 1e-4, margin=1e-6)
    assert (sklearn_labels(no_expansion, 1e-4, 2) == -1).all()
    assert (dbscan_pseudo_labels(x, eps=1e-4, min_samples=2, k2=1) == -1).all()
    # One tight blob: every point in a single cluster. (Its neighbour lists have near-ties, so the Jaccard values
    # may differ from the reference in float32; the partition does not depend on them: all <= 0.36, eps 0.95.)
    blob = identity_features(num_ids=1, per_id=40, dim=16, noise=0.05, seed=7)
    np.testing.assert_array_equal(canonical(dbscan_pseudo_labels(blob, eps=0.95)),
                                  canonical(sklearn_labels(dense_jaccard(blob, 30, 6), 0.95, 4)))
    assert (dbscan_pseudo_labels(blob, eps=0.95) == 0).all()
    # eps >= 1: all Jaccard distances are <= 1, so everything is one cluster (or all outliers).
    assert (dbscan_pseudo_labels(x, eps=1.0) == 0).all()
    assert (dbscan_pseudo_labels(x[:3], eps=1.5) == -1).all()
    np.testing.assert_array_equal(sklearn_labels(reference, 1.0, 4), 0)


def test_dbscan_eps_on_both_sides_of_a_boundary():
    x = identity_features(num_ids=15, per_id=6, dim=24, noise=0.7, seed=8)
    assert_tie_free_cutoffs(x, 30, 6)
    reference = dense_jaccard(x, 30, 6)
    values = np.unique(reference[reference < 1])
    # Find a Jaccard value where sklearn's partition changes, with room for float32 rounding.
    for low, value, high in zip(values[:-2], values[1:-1], values[2:]):
        if value < 0.3 or min(value - low, high - value) < 1e-4:
            continue
        below = sklearn_labels(reference, value - 5e-5, 4)
        above = sklearn_labels(reference, value + 5e-5, 4)
        if not np.array_equal(canonical(below), canonical(above)):
            break
    else:
        pytest.fail("no partition-changing Jaccard value found in the test data")
    np.testing.assert_array_equal(canonical(dbscan_pseudo_labels(x, eps=value - 5e-5, normalize=False)),
                                  canonical(below))
    np.testing.assert_array_equal(canonical(dbscan_pseudo_labels(x, eps=value + 5e-5, normalize=False)),
                                  canonical(above))


@pytest.mark.parametrize("seed", range(4))
def test_graph_dbscan_equals_sklearn_labels_exactly(seed):
    # Random symmetric sparse distance graphs with border points between clusters; labels (not just
    # partitions) must equal sklearn's, including its border-point assignment order.
    rng = np.random.default_rng(seed)
    n = 120
    dense = np.ones((n, n))
    upper = np.triu(rng.random((n, n)) < 0.06, 1)
    dense[upper] = rng.uniform(0.0, 0.9, size=upper.sum())
    dense = np.minimum(dense, dense.T)
    np.fill_diagonal(dense, 0.0)
    graph = sp.csr_matrix(np.where(dense < 1, dense, 0.0))
    graph.setdiag(0.0)  # explicit zeros on the diagonal
    graph = sp.csr_matrix(graph)
    for eps, min_samples in [(0.5, 3), (0.4, 2), (0.7, 5)]:
        expected = sklearn_labels(dense, eps, min_samples)
        np.testing.assert_array_equal(dbscan_from_graph(graph, eps, min_samples), expected)


@pytest.mark.parametrize("cluster_a,cluster_b,border", [
    ([0, 1, 2, 3], [4, 5, 6, 7], 8),
    ([5, 6, 7, 8], [1, 2, 3, 4], 0),
    ([1, 3, 5, 7], [0, 2, 4, 6], 8),
])
def test_border_point_between_two_clusters_goes_where_sklearn_puts_it(cluster_a, cluster_b, border):
    dense = np.ones((9, 9))
    for clique in (cluster_a, cluster_b):
        dense[np.ix_(clique, clique)] = 0.2
    for core in (cluster_a[-1], cluster_b[-1]):  # the border point touches one core of each clique
        dense[border, core] = dense[core, border] = 0.3
    np.fill_diagonal(dense, 0.0)
    graph = sp.csr_matrix(np.where(dense < 1, dense, 0.0))
    graph.setdiag(0.0)
    expected = sklearn_labels(dense, 0.5, 4)
    assert expected[border] != -1 and len(set(expected)) == 2
    np.testing.assert_array_equal(dbscan_from_graph(sp.csr_matrix(graph), 0.5, 4), expected)


def test_sklearn_sparse_precomputed_agrees_on_the_jaccard_graph():
    # The explicit diagonal zeros make sklearn's sparse precomputed path see each point as its own
    # neighbour; both must give the dense result.
    x = identity_features(num_ids=20, per_id=6, dim=24, noise=0.7, seed=9)
    graph = jaccard_sparse(x, 30, 6, max_distance=0.6)
    sparse_sklearn = DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(graph)
    np.testing.assert_array_equal(dbscan_from_graph(graph, 0.6, 4), sparse_sklearn)


def test_dbscan_bad_parameters():
    x = identity_features(num_ids=3, per_id=3, dim=4, noise=0.3, seed=10)
    with pytest.raises(EvaluationInputError, match="eps"):
        dbscan_pseudo_labels(x, eps=0.0)
    with pytest.raises(EvaluationInputError, match="min_samples"):
        dbscan_pseudo_labels(x, min_samples=0)
    with pytest.raises(EvaluationInputError, match="square"):
        dbscan_from_graph(sp.csr_matrix((3, 4)), 0.5)


def test_overlap_accumulator_modes_agree_bit_for_bit():
    from passreid.cluster.kreciprocal import OverlapAccumulator, OverlapIndex, plan_row_chunks

    rng = np.random.default_rng(12)
    encodings = sp.random(300, 300, density=0.05, random_state=12, dtype=np.float32, format="csr")
    encodings.data = rng.uniform(0.01, 1.0, size=encodings.nnz).astype(np.float32)
    index = OverlapIndex.build(encodings)
    scratch_mode, sort_mode = OverlapAccumulator(index, scratch=True), OverlapAccumulator(index, scratch=False)
    chunks = plan_row_chunks(index, max_pairs=3000, max_rows=scratch_mode.max_rows)
    dense = encodings.toarray()
    shared = np.triu((dense > 0).astype(int) @ (dense > 0).T.astype(int) > 0)
    assert sum(end - start for start, end in chunks) == 300 and len(chunks) > 5
    found = 0
    for start, end in chunks:
        cells_a, sums_a = scratch_mode(start, end)
        cells_b, sums_b = sort_mode(start, end)
        order_a, order_b = cells_a.argsort(), cells_b.argsort()
        cells_a, sums_a, cells_b, sums_b = cells_a[order_a], sums_a[order_a], cells_b[order_b], sums_b[order_b]
        np.testing.assert_array_equal(cells_a, cells_b)
        np.testing.assert_array_equal(sums_a, sums_b)
        # Against the definition, upper triangle only.
        rows = cells_a // 300 + start
        cols = cells_a % 300
        assert (cols >= rows).all()
        expected = np.minimum(dense[rows], dense[cols]).sum(1)
        np.testing.assert_allclose(sums_a, expected, rtol=1e-5)
        found += len(cells_a)
    assert found == shared.sum()  # every pair sharing a column, each once
