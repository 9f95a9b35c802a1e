"""The device a stage trains on: ``train.device`` of every stage resolves here."""
from __future__ import annotations

import re

import torch

from passreid.config import ConfigError

__all__ = ["select_device"]


def select_device(spec: str, local_rank: int = 0) -> torch.device:
    """``train.device`` as a device: ``auto`` is ``cuda:<local_rank>`` when CUDA is available, else the CPU;
    ``cuda`` is ``cuda:<local_rank>`` (one GPU per process under torchrun / srun); ``cpu`` and ``cuda:N`` as given.
    A value of another form, or CUDA asked for where there is none, is a :class:`ConfigError`."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if spec != "cpu" and not re.fullmatch(r"cuda(:\d+)?", spec):
        raise ConfigError(f"config key 'train.device': must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"config key 'train.device': {spec!r} but CUDA is not available")
    return torch.device(spec if ":" in spec else f"cuda:{local_rank}")
