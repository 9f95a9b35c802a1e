"""Seeding and random-number-generator state capture for exact resume.

``capture_rng_state`` stores plain Python types and tensors only (no numpy arrays), so the
state survives ``torch.load(weights_only=True)`` and is readable without numpy pickles.

Scope: the *global* generators of Python ``random``, numpy's legacy ``np.random`` and
torch (CPU and every visible CUDA device). Private generators (``np.random.default_rng``,
``torch.Generator`` objects, DataLoader worker processes) are not global state: a stage
that needs them exact must store them itself, e.g. in the checkpoint's ``"extra"``.
"""
from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

logger = logging.getLogger(__name__)

_MAX_SEED = 2**32 - 1  # numpy's legacy seeding accepts 32-bit seeds only
RNG_KEYS = ("python", "numpy", "torch", "cuda")


def seed_everything(seed: int) -> int:
    """Seed Python ``random``, numpy's global generator and torch (CPU + all CUDA devices).

    Returns the seed. ``seed`` must be an int in [0, 2**32 - 1].
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed_everything: seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed_everything: seed must be in [0, 2**32 - 1], got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return seed


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed.

    Inside a worker, ``torch.initial_seed()`` is ``base_seed + worker_id`` where the DataLoader
    draws ``base_seed`` from its ``generator`` (or the global torch RNG) when an iterator is
    created. So after ``seed_everything`` every worker gets a distinct, reproducible stream.
    Recent torch versions seed these libraries too; doing it here makes the derivation
    explicit and independent of the torch version.
    """
    del worker_id  # already folded into torch.initial_seed()
    worker_seed = torch.initial_seed()
    random.seed(worker_seed)
    np.random.seed(np.random.SeedSequence(worker_seed).generate_state(4))


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the non-negative ``keys`` (independent streams for
    different key tuples, via numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(key) for key in keys]).generate_state(1, dtype=np.uint64)[0] % 2**63)


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, numpy's and ``random``'s global generators for one block, then put
    the previous states back.

    Per-sample augmentation uses it: torchvision / timm transforms draw from these generators, so the
    block's draws are a pure function of ``seed`` wherever the sample is loaded (main process or any
    worker), while the caller's own streams (e.g. drop-path in the main process with ``num_workers=0``)
    continue where they were. Only the CPU generator is seeded: ``torch.manual_seed`` would also seed
    every CUDA device, which in a worker without CUDA costs ~1 ms a call for nothing.
    """
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the global RNG states of this process (see module docstring for the scope).

    Returns ``{"python", "numpy", "torch", "cuda"}``; ``"cuda"`` is a list with one state per
    visible device, or ``None`` without CUDA.
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    cuda_states = None
    if torch.cuda.is_available():
        cuda_states = [state.clone() for state in torch.cuda.get_rng_state_all()]
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda_states,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states produced by :func:`capture_rng_state`.

    CUDA states are restored for the visible devices; a mismatch (checkpoint from a GPU run
    resumed without CUDA, or a different device count) is logged as a warning because exact
    continuation is then impossible for the affected generators.
    """
    missing = [key for key in RNG_KEYS if key not in state]
    if missing:
        raise KeyError(
            f"restore_rng_state: state is missing {missing}; expected the dict returned by "
            f"capture_rng_state() with keys {list(RNG_KEYS)}"
        )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np.asarray(np_state["keys"], dtype=np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    _restore_cuda_states(state["cuda"])


def _restore_cuda_states(cuda_states: list[torch.Tensor] | None) -> None:
    if cuda_states is None:
        return
    if not torch.cuda.is_available():
        logger.warning(
            "checkpoint holds CUDA RNG states for %d device(s) but CUDA is not available; "
            "CUDA random streams are not restored",
            len(cuda_states),
        )
        return
    device_count = torch.cuda.device_count()
    if len(cuda_states) != device_count:
        logger.warning(
            "checkpoint holds CUDA RNG states for %d device(s), this process sees %d; "
            "restoring the first %d",
            len(cuda_states),
            device_count,
            min(len(cuda_states), device_count),
        )
    for index, device_state in enumerate(cuda_states[:device_count]):
        torch.cuda.set_rng_state(device_state.cpu(), device=index)


def gather_rng_states() -> list[dict[str, Any]]:
    """RNG states of every rank, index = rank (a list of one state without a process group).

    Under an initialised ``torch.distributed`` process group this is a COLLECTIVE call: every
    rank must call it (rank 0 then stores the list in the checkpoint).
    """
    local = capture_rng_state()
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return [local]
    gathered: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, local)
    return gathered
