"""Stop training on a non-finite loss before it reaches the weights or a checkpoint."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from passreid import dist


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; ``step`` and ``value`` say where and what."""

    def __init__(self, message: str, step: int, value: float) -> None:
        super().__init__(message)
        self.step = step
        self.value = value


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a scalar loss, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().item())
    return float(value)


def check_finite(loss: torch.Tensor | float, step: int, extra: Mapping[str, Any] | None = None) -> float:
    """Return the scalar ``loss`` as a float, or raise :class:`NonFiniteLossError` if it is NaN/Inf.

    ``step`` is the step in the error message; the trainers pass the 1-based number of the step being
    taken (``step - 1`` steps completed).

    Call it before ``backward()``. Let the error propagate: a loop that catches it and saves
    a checkpoint afterwards would overwrite the last good one with poisoned weights or
    optimizer state. ``extra`` (e.g. the individual loss terms) is included in the message.
    Forces a device sync on GPU (reads the value), like every logged loss does.
    """
    value = _as_float(loss)
    if math.isfinite(value):
        return value
    details = ""
    if extra:
        details = " (" + ", ".join(f"{key}={_format(val)}" for key, val in extra.items()) + ")"
    message = (
        f"non-finite loss {value} at step {step}{details}. Training stopped; no checkpoint is "
        f"written after this point, so the last good checkpoint on disk is kept unchanged and "
        f"a restart resumes from it (fix the cause first, or it diverges again). Usual causes: "
        f"learning rate too high, fp16 overflow (try precision 'bf16' or 'fp32', or gradient "
        f"clipping), or corrupt input data."
    )
    raise NonFiniteLossError(message, step=step, value=value)


def _format(value: Any) -> str:
    try:
        return f"{_as_float(value):.6g}"
    except (TypeError, ValueError):
        return repr(value)


def check_finite_on_every_rank(loss: torch.Tensor, step: int, extra: Mapping[str, Any] | None = None) -> float:
    """:func:`check_finite` that raises on every process when the loss of any one is NaN/Inf.

    A collective under a process group (every rank calls it at the same step, before ``backward``): a
    rank that raised alone would leave the others waiting in the gradient all-reduce of ``backward``
    until the collective timeout. The mean over ranks is non-finite exactly when some rank's loss is.
    """
    if dist.get_world_size() == 1:
        return check_finite(loss, step, extra)
    local = loss.detach().float().reshape(1)
    mean = float(dist.all_reduce_mean(local))
    if math.isfinite(mean):
        return _as_float(loss)
    check_finite(loss, step, extra)  # this rank's own loss is the culprit: its message
    # Another rank's loss is: the error reports the mean over ranks, and this rank's finite loss.
    return check_finite(mean, step, {"this rank's loss": _as_float(loss), "mean over ranks": mean, **(extra or {})})
