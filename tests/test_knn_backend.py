"""passreid.cluster.knn: which backend ``"auto"`` picks, and faiss and torch agreeing up to ties."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from passreid.cluster import knn
from passreid.cluster.knn import resolve_knn_backend
from passreid.feature_inputs import EvaluationInputError


def fake_faiss(num_gpus: int | None) -> types.ModuleType:
    """A stand-in ``faiss`` module for the choice logic only: a CPU build has no ``get_num_gpus``."""
    module = types.ModuleType("faiss")
    if num_gpus is not None:
        module.get_num_gpus = lambda: num_gpus
    return module


@pytest.fixture
def machine(monkeypatch):
    """Set what resolve_knn_backend sees: faiss (None: not installed), CUDA, torch's thread count."""

    def set_machine(*, faiss: types.ModuleType | None, cuda: bool, threads: int) -> None:
        monkeypatch.setitem(sys.modules, "faiss", faiss)  # None makes ``import faiss`` raise ImportError
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)

    return set_machine


@pytest.mark.parametrize("threads", [1, 2, 16])
def test_auto_without_faiss_is_torch(machine, threads):
    machine(faiss=None, cuda=False, threads=threads)
    assert resolve_knn_backend("auto") == "torch"
    machine(faiss=None, cuda=True, threads=threads)
    assert resolve_knn_backend("auto") == "torch"


@pytest.mark.parametrize("num_gpus", [None, 0])  # faiss-cpu, or a GPU build that sees no GPU
def test_auto_on_the_cpu_uses_faiss_with_more_than_one_thread(machine, num_gpus):
    machine(faiss=fake_faiss(num_gpus), cuda=False, threads=2)
    assert resolve_knn_backend("auto") == "faiss"
    assert resolve_knn_backend("auto", "cpu") == "faiss"
    machine(faiss=fake_faiss(num_gpus), cuda=False, threads=1)
    assert resolve_knn_backend("auto") == "torch"


def test_auto_on_cuda_needs_faiss_gpus(machine):
    machine(faiss=fake_faiss(2), cuda=True, threads=1)
    assert resolve_knn_backend("auto") == "faiss"  # default device: CUDA
    assert resolve_knn_backend("auto", "cuda") == "faiss"
    assert resolve_knn_backend("auto", "cpu") == "torch"  # pinned to one CPU thread: torch
    machine(faiss=fake_faiss(None), cuda=True, threads=4)
    assert resolve_knn_backend("auto") == "torch"  # faiss-cpu cannot use the GPU; torch runs there
    assert resolve_knn_backend("auto", "cpu") == "faiss"
    machine(faiss=fake_faiss(1), cuda=False, threads=1)  # GPU build, but CUDA is not available
    assert resolve_knn_backend("auto") == "torch"


def test_named_backends_are_kept_and_unknown_ones_refused(machine):
    machine(faiss=None, cuda=False, threads=2)
    assert resolve_knn_backend("torch") == "torch"
    with pytest.raises(EvaluationInputError, match=r"faiss is not installed: pip install 'passreid\[faiss\]'"):
        resolve_knn_backend("faiss")
    with pytest.raises(EvaluationInputError, match="unknown kNN backend"):
        resolve_knn_backend("annoy")
    machine(faiss=fake_faiss(None), cuda=False, threads=1)
    assert resolve_knn_backend("faiss") == "faiss"


def tied_features() -> np.ndarray:
    """Rows with many exact ties: every point appears three times, and points lie on a coarse grid."""
    rng = np.random.default_rng(3)
    base = rng.integers(-3, 4, size=(120, 6)).astype(np.float32)
    return np.concatenate([base, base, base])


@pytest.mark.parametrize("metric", ["sqeuclidean", "inner_product"])
def test_faiss_and_torch_agree_up_to_ties(metric):
    pytest.importorskip("faiss")
    x = tied_features()
    k = 10
    d_torch, i_torch = knn(x, k, backend="torch", metric=metric, device="cpu")
    d_faiss, i_faiss = knn(x, k, backend="faiss", metric=metric, device="cpu")
    # Integer coordinates: every distance / inner product is an exact small integer in float32, so
    # the sorted distance lists must be identical (no rounding tolerance needed).
    torch.testing.assert_close(d_torch, d_faiss, rtol=0, atol=0)
    x64 = x.astype(np.float64)
    exact = ((x64[:, None] - x64[None]) ** 2).sum(-1) if metric == "sqeuclidean" else -(x64 @ x64.T)
    for row in range(len(x)):
        torch_set, faiss_set = set(i_torch[row].tolist()), set(i_faiss[row].tolist())
        if torch_set == faiss_set:
            continue
        # Different members are allowed only among the rows tied with the k-th distance.
        kth = np.sort(exact[row])[k - 1]
        for other in torch_set ^ faiss_set:
            assert exact[row, other] == kth, (row, other)


def test_faiss_cpu_search_uses_torch_threads_and_restores_faiss(monkeypatch):
    faiss = pytest.importorskip("faiss")
    before = faiss.omp_get_max_threads()
    seen = []
    real_search = faiss.IndexFlatL2.search

    def spy(self, *args, **kwargs):
        seen.append(faiss.omp_get_max_threads())
        return real_search(self, *args, **kwargs)

    monkeypatch.setattr(faiss.IndexFlatL2, "search", spy)
    with_threads = torch.get_num_threads()
    knn(np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32), 5, backend="faiss", device="cpu")
    assert seen == [with_threads]
    assert faiss.omp_get_max_threads() == before
