"""passreid: PASS part-aware self-supervised pre-training and person re-identification.

``passreid.FeatureExtractor`` and ``passreid.load_model`` (see :mod:`passreid.inference`) are imported
on first use, so ``import passreid`` stays light (no torch import).
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY_EXPORTS = {"FeatureExtractor": "passreid.inference", "load_model": "passreid.inference"}

__all__ = ["FeatureExtractor", "__version__", "load_model"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
        globals()[name] = value  # later accesses skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
