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
    from passreid.data.synthetic import generate_world

    return generate_world(tmp_path_factory.mktemp("synthetic_world"))
