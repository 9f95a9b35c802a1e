"""Checks on feature matrices and the choice of compute device, shared by the retrieval kernels (``eval/``) and
the clustering kernels (``cluster/``), so that neither package imports the other's internals."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["EvaluationInputError", "as_feature_tensor", "check_finite_features", "resolve_device"]


class EvaluationInputError(ValueError):
    """Invalid input to an evaluation function (wrong shape, dtype, non-finite values, ...)."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; a device name torch does not know, or a CUDA request
    without CUDA, is an :class:`EvaluationInputError`."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise EvaluationInputError(f"device {device!r} is not a device name (expected e.g. cpu, cuda or cuda:0): "
                                   f"{error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationInputError(f"device '{device}' was requested but CUDA is not available")
    return device


def as_feature_tensor(feats: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Validate a ``(N, D)`` floating-point feature matrix and return it as a float32 CPU/GPU tensor.

    Raises :class:`EvaluationInputError` naming ``name`` for a wrong rank, an empty matrix, a
    non-floating dtype or NaN/Inf values.
    """
    if isinstance(feats, np.ndarray):
        if not np.issubdtype(feats.dtype, np.floating):
            raise EvaluationInputError(f"{name}: expected floating-point features, got dtype {feats.dtype}")
        feats = torch.from_numpy(np.ascontiguousarray(feats))
    elif not isinstance(feats, torch.Tensor):
        raise EvaluationInputError(f"{name}: expected a torch.Tensor or numpy array, got {type(feats).__name__}")
    if not feats.is_floating_point():
        raise EvaluationInputError(f"{name}: expected floating-point features, got dtype {feats.dtype}")
    if feats.dim() != 2:
        raise EvaluationInputError(f"{name}: expected a 2-D (N, D) feature matrix, got shape {tuple(feats.shape)}")
    if feats.shape[0] == 0 or feats.shape[1] == 0:
        raise EvaluationInputError(f"{name}: feature matrix is empty (shape {tuple(feats.shape)})")
    check_finite_features(feats, name)
    return feats.float()


def check_finite_features(values: torch.Tensor, name: str) -> None:
    """Raise :class:`EvaluationInputError` naming ``name`` when ``values`` hold NaN or Inf."""
    # The sum is one cheap pass and non-finite whenever an element is (or, rarely, on overflow).
    if bool(torch.isfinite(values.sum())):
        return
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        kind = "NaN" if bool(torch.isnan(values).any()) else "Inf"
        raise EvaluationInputError(
            f"{name}: contains {int(bad.sum())} non-finite value(s) ({kind}; first at index {first})"
        )
