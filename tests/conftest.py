"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` skip, with the reason, where CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a GPU (CUDA is not available)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
DEFAULT_MARKET_ROOT = REPO_ROOT.parent / "shared" / "data" / "Market-1501-v15.09.15"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): on a busy
    2-core machine two threads that wait for each other run several times slower than one, and one thread keeps
    the float summation order fixed within the module."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def market1501_root() -> Path:
    """Root of the real Market-1501 release; the test is skipped when it is absent.

    Read from ``PASSREID_MARKET1501``, falling back to ``../shared/data/Market-1501-v15.09.15``
    next to the checkout.
    """
    root = Path(os.environ.get("PASSREID_MARKET1501", DEFAULT_MARKET_ROOT))
    if not (root / "bounding_box_train").is_dir():
        pytest.skip(f"real Market-1501 not found at {root} (set PASSREID_MARKET1501)")
    return root


@pytest.fixture(scope="session")
def synthetic_world(tmp_path_factory) -> Path:
    """The default generated world (seed 0), rendered once per test session."""
    from passreid.demo import render_demo_world

    return render_demo_world("world", tmp_path_factory.mktemp("synthetic_world"))


def _demo_world(name: str, tmp_path_factory) -> Path:
    from passreid.demo import render_demo_world

    return render_demo_world(name, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def monitor_world(tmp_path_factory) -> Path:
    """The pre-training demo's kNN-monitor world (seed 1: persons training has not seen)."""
    return _demo_world("monitor_world", tmp_path_factory)


@pytest.fixture(scope="session")
def usl_world(tmp_path_factory) -> Path:
    """The USL demo's larger world (100 train ids)."""
    return _demo_world("usl_world", tmp_path_factory)


@pytest.fixture(scope="session")
def uda_world(tmp_path_factory) -> Path:
    """The UDA demo's target world (seed 2: other people, 6 other cameras)."""
    return _demo_world("uda_world", tmp_path_factory)
