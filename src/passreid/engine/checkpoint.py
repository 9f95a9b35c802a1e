"""Atomic checkpoint files and the full-training-state convention.

One file of ~400 lines on purpose: the kept previous checkpoint and the restore of every piece of training
state must agree on one file layout; keeping them together keeps that contract in one place. The atomic write
itself (temp file, fsync, rename) is :mod:`passreid.atomic_files`, shared with every other file passreid writes.

Checkpoint dict convention (``build_checkpoint`` writes it, ``restore_checkpoint`` reads it);
every key is always present, ``None`` when the run has no such object:

=============  =================================================================================
key            content
=============  =================================================================================
``model``      ``state_dict()`` of the model (DDP / DataParallel wrappers are unwrapped)
``optimizer``  ``optimizer.state_dict()`` (momentum buffers, Adam moments, param-group lrs)
``scheduler``  ``scheduler.state_dict()`` of a stateful LR scheduler; ``None`` for the
               dinov2-style precomputed arrays, which are indexed by ``iteration`` instead
``scaler``     ``GradScaler.state_dict()`` (fp16 runs only)
``epoch``      the epoch in progress, 0-based
``iteration``  optimizer steps completed so far = index of the next step
``rng``        list of :func:`~passreid.seeding.capture_rng_state` dicts, index = rank
``sampler``    the sampler position (its ``state_dict()``, or a plain dict from the loop)
``config``     the resolved config as a plain dict (``passreid.config.config_to_dict(cfg)``)
``extra``      stage-specific picklable state (teacher temperature, pseudo labels, best mAP, ...)
=============  =================================================================================

A checkpoint is taken *after* an optimizer step, so resuming continues at step ``iteration``
with the sampler at the stored position and the RNG exactly where the interrupted run was.

Damage after the fact (a truncated copy, a disk error): :class:`Checkpointer` keeps the checkpoint
that its latest save replaced as ``checkpoint.prev.pth`` and resumes from it, with a warning, when
``checkpoint.pth`` cannot be read. A full disk while writing is an ``OSError(ENOSPC)`` that says the
previous checkpoint is intact (the new file is complete before anything is renamed).

Non-finite losses: :func:`passreid.engine.check_finite` raises before ``backward``; the loop
must let the error propagate (no ``finally: save``), so ``checkpoint.pth`` keeps the last
good state.
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from passreid.atomic_files import (atomic_write, commit, fsync_directory, link_atomically, new_temp_path,
                                   remove_stale_temp_files, write_temp)
from passreid.engine.output import CHECKPOINT_FILE
from passreid.seeding import capture_rng_state, restore_rng_state, seed_everything

logger = logging.getLogger(__name__)

CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "epoch",
    "iteration",
    "rng",
    "sampler",
    "config",
    "extra",
)
PREVIOUS_INFIX = ".prev"  # checkpoint.pth -> checkpoint.prev.pth
_START_FRESH = "To start fresh, run again with --no-resume (resume=False): the run overwrites these files."


class CheckpointCorruptError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, garbage, not a dict)."""


class CheckpointStateError(ValueError):
    """A checkpoint does not match the objects it is restored into."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


# --------------------------------------------------------------------------- atomic file writes


def atomic_save(obj: Any, path: str | os.PathLike[str], *, what: str = "file") -> Path:
    """``torch.save(obj)`` to ``path`` so that readers only ever see a complete file
    (:func:`passreid.atomic_files.atomic_write`: temp file, fsync, rename). A process killed mid-write leaves
    the previous ``path`` intact; a full disk raises ``OSError(ENOSPC)`` "no space left on device while writing
    <path>; the previous <what> <path> is intact"."""
    return atomic_write(path, lambda handle: torch.save(obj, handle), what=what)


# --------------------------------------------------------------------------- Checkpointer


def previous_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """Where :class:`Checkpointer` keeps the version of ``path`` that its latest save replaced:
    ``checkpoint.pth`` -> ``checkpoint.prev.pth``."""
    path = Path(path)
    return path.with_name(f"{path.stem}{PREVIOUS_INFIX}{path.suffix}")


class Checkpointer:
    """Saves and loads training checkpoints inside one output directory.

    Every rank may call :meth:`save`; only the main rank (``is_main=True``) touches the disk.

    Each save keeps the file it replaces as ``<stem>.prev<suffix>`` (``checkpoint.prev.pth``; a hard link,
    or a rename where the filesystem has none), so one earlier checkpoint survives damage to the latest
    (a copy cut short, a disk error). Only a file of this run is kept that way: one that this
    Checkpointer wrote or read back whole. The first save of a run that did not resume removes a
    previous version left by an earlier run, and a save after resuming from the previous version keeps
    it (the damaged latest is simply replaced). :meth:`load` falls back to the previous version.

    With ``keep_every=N``, a save with ``step`` divisible by N also keeps a named copy
    ``<stem>_<step:07d><suffix>`` (a hard link when the filesystem allows, else a copy).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        is_main: bool = True,
        keep_every: int | None = None,
    ) -> None:
        if keep_every is not None and keep_every <= 0:
            raise ValueError(f"Checkpointer: keep_every must be a positive int or None, got {keep_every}")
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.keep_every = keep_every
        self.loaded_from: Path | None = None  # the file the last load() read
        self._sound: set[Path] = set()  # files this Checkpointer wrote or read back whole (as they are now)

    def path(self, name: str = CHECKPOINT_FILE) -> Path:
        """Absolute location of checkpoint ``name`` (a bare file name)."""
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"Checkpointer: name must be a plain file name, got {name!r}")
        return self.output_dir / name

    def previous_path(self, name: str = CHECKPOINT_FILE) -> Path:
        """Where the version of ``name`` replaced by the latest save is kept (see the class docstring)."""
        return previous_checkpoint_path(self.path(name))

    def has_checkpoint(self, name: str = CHECKPOINT_FILE) -> bool:
        """Whether ``name`` or its previous version exists (temp files of interrupted writes never count)."""
        return self.path(name).is_file() or self.previous_path(name).is_file()

    def save(self, state: Mapping[str, Any], name: str = CHECKPOINT_FILE, step: int | None = None) -> Path | None:
        """Atomically write ``state``; returns the path on the main rank, ``None`` elsewhere.

        The new file is complete on disk before anything is renamed, so a full disk (``OSError(ENOSPC)``,
        see :func:`atomic_save`) or a kill leaves both the latest and the previous checkpoint as they were.
        """
        if not self.is_main:
            return None
        if not isinstance(state, Mapping):
            raise TypeError(f"Checkpointer.save: state must be a dict, got {type(state).__name__}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        target, previous = self.path(name), self.previous_path(name)
        temp = write_temp(target, lambda handle: torch.save(dict(state), handle), what="checkpoint")
        try:
            self._keep_previous(target, previous)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        commit(temp, target)
        self._sound.add(target)
        if self.keep_every is not None and step is not None and step % self.keep_every == 0:
            self._keep_copy(target, step)
        return target

    def _keep_previous(self, target: Path, previous: Path) -> None:
        """Before ``target`` is replaced: keep it as ``previous`` if it is this run's, else drop a ``previous``
        that is not."""
        if target in self._sound and target.is_file():
            if not link_atomically(target, previous):  # no hard links: for a moment only `previous` exists,
                os.replace(target, previous)            # and load() falls back to it
                fsync_directory(previous.parent)
            self._sound.add(previous)
        elif previous not in self._sound:
            previous.unlink(missing_ok=True)  # an earlier run's, or of unknown state

    def _keep_copy(self, source: Path, step: int) -> Path:
        copy = source.with_name(f"{source.stem}_{step:07d}{source.suffix}")
        if not link_atomically(source, copy):  # filesystem without hard links
            remove_stale_temp_files(copy)
            temp = new_temp_path(copy)
            try:
                shutil.copyfile(source, temp)
                with open(temp, "rb+") as handle:
                    os.fsync(handle.fileno())
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            commit(temp, copy)
        return copy

    def load(
        self, name: str = CHECKPOINT_FILE, map_location: Any = "cpu", weights_only: bool = False
    ) -> dict[str, Any] | None:
        """Load checkpoint ``name``, or its previous version when ``name`` is missing or cannot be read (a
        warning names both files); ``None`` if neither exists. :attr:`loaded_from` is the file read.

        ``weights_only=False`` by default because this run's own checkpoints carry arbitrary
        picklable ``extra`` state; never point a Checkpointer at untrusted files.
        Raises :class:`CheckpointCorruptError` naming the files, and how to start fresh, when no
        version can be read.
        """
        target, previous = self.path(name), self.previous_path(name)
        self.loaded_from = None
        latest_error: CheckpointCorruptError | None = None
        if target.is_file():
            try:
                return self._read(target, map_location, weights_only)
            except CheckpointCorruptError as error:
                latest_error = error
        if not previous.is_file():
            if latest_error is not None:
                raise CheckpointCorruptError(f"{latest_error}. {_START_FRESH}") from latest_error
            return None
        try:
            state = self._read(previous, map_location, weights_only)
        except CheckpointCorruptError as error:
            if latest_error is None:
                raise CheckpointCorruptError(f"{target} is missing and {error}. {_START_FRESH}") from error
            raise CheckpointCorruptError(f"neither the latest nor the previous checkpoint can be read: "
                                         f"{latest_error}; {error}. {_START_FRESH}") from error
        logger.warning("%s; resuming from the previous checkpoint %s instead (the one before it)",
                       latest_error if latest_error is not None else f"checkpoint {target} is missing", previous)
        return state

    def _read(self, path: Path, map_location: Any, weights_only: bool) -> dict[str, Any]:
        try:
            state = torch.load(path, map_location=map_location, weights_only=weights_only)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
            raise CheckpointCorruptError(
                f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}): the file is truncated or corrupt"
            ) from exc
        if not isinstance(state, dict):
            raise CheckpointCorruptError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
        self.loaded_from = path
        self._sound.add(path)
        return state


# --------------------------------------------------------------------------- training state


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (else ``model``)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _state_of(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return dict(obj)
    if not hasattr(obj, "state_dict"):
        raise TypeError(f"build_checkpoint: {key} must have state_dict() or be a dict, got {type(obj).__name__}")
    return obj.state_dict()


def build_checkpoint(
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Stateful | None = None,
    scaler: torch.amp.GradScaler | None = None,
    epoch: int = 0,
    iteration: int = 0,
    sampler: Stateful | Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Assemble the checkpoint dict described in the module docstring.

    ``rng_states`` defaults to this process's state only. For exact multi-rank resume pass
    :func:`~passreid.seeding.gather_rng_states()` (a collective: call it on every rank).
    """
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(
            "build_checkpoint: config must be a plain dict; convert a dataclass config with "
            f"passreid.config.config_to_dict(cfg) (got {type(config).__name__})"
        )
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"build_checkpoint: extra must be a dict, got {type(extra).__name__}")
    return {
        "model": None if model is None else unwrap_model(model).state_dict(),
        "optimizer": _state_of(optimizer, "optimizer"),
        "scheduler": _state_of(scheduler, "scheduler"),
        "scaler": _state_of(scaler, "scaler"),
        "epoch": int(epoch),
        "iteration": int(iteration),
        "rng": rng_states if rng_states is not None else [capture_rng_state()],
        "sampler": _state_of(sampler, "sampler"),
        "config": None if config is None else dict(config),
        "extra": {} if extra is None else dict(extra),
    }


@dataclass
class ResumeInfo:
    """What :func:`restore_checkpoint` hands back to the loop."""

    epoch: int
    iteration: int
    sampler: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _load_into(obj: Any, state: Any, key: str) -> None:
    if obj is None:
        return
    if state is None:
        raise CheckpointStateError(
            f"restore_checkpoint: the checkpoint has no '{key}' state but a {key} was passed; "
            f"it was saved by a run without one. Pass {key}=None or start a fresh run."
        )
    try:
        obj.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as error:  # torch's strict key / shape / group checks
        raise CheckpointStateError(
            f"restore_checkpoint: the checkpoint's {key} state does not fit this run's {key} (was the config "
            f"changed since it was written?): {error}. Resume with the settings it was written with, or start "
            f"fresh with --no-resume"
        ) from error


def restore_checkpoint(
    checkpoint: Mapping[str, Any],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Stateful | None = None,
    scaler: torch.amp.GradScaler | None = None,
    sampler: Stateful | None = None,
    restore_rng: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> ResumeInfo:
    """Load a :func:`build_checkpoint` dict into the given objects (``None`` = skip that object).

    The model is loaded strictly. An object passed here whose state the checkpoint lacks, or
    whose state does not fit (other keys or shapes: a changed config), is a
    :class:`CheckpointStateError`, except a missing AMP scaler: changing precision on resume is
    allowed and logged.
    ``sampler`` receives ``load_state_dict`` if given; the raw state is also returned for loops
    that track the position themselves. RNG: rank ``r`` restores ``rng[r]``; with a different
    world size than at save time, exact continuation is impossible and ranks without a stored
    state are re-seeded from ``(iteration, rank)`` (a warning says so).
    """
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointStateError(
            f"restore_checkpoint: not a passreid training checkpoint (missing keys {missing}; "
            f"expected {list(CHECKPOINT_KEYS)}). To load weights only, use passreid.models.load_pretrained."
        )
    if model is not None:
        _load_into(unwrap_model(model), checkpoint["model"], "model")
    _load_into(optimizer, checkpoint["optimizer"], "optimizer")
    _load_into(scheduler, checkpoint["scheduler"], "scheduler")
    if scaler is not None and checkpoint["scaler"] is None:
        logger.warning("checkpoint has no AMP scaler state (saved without fp16); the GradScaler starts fresh")
    else:
        _load_into(scaler, checkpoint["scaler"], "scaler")
    _load_into(sampler, checkpoint["sampler"], "sampler")
    if restore_rng:
        _restore_rank_rng(checkpoint["rng"], int(checkpoint["iteration"]), rank, world_size)
    return ResumeInfo(
        epoch=int(checkpoint["epoch"]),
        iteration=int(checkpoint["iteration"]),
        sampler=checkpoint["sampler"],
        config=checkpoint["config"],
        extra=dict(checkpoint["extra"] or {}),
    )


def _restore_rank_rng(rng_states: Any, iteration: int, rank: int, world_size: int) -> None:
    if isinstance(rng_states, Mapping):  # a single state stored by hand
        rng_states = [rng_states]
    if not rng_states:
        raise CheckpointStateError("restore_checkpoint: the checkpoint has no RNG state; pass restore_rng=False")
    if len(rng_states) != world_size:
        logger.warning(
            "checkpoint holds RNG states of %d rank(s), resuming with world size %d: random "
            "streams will not continue exactly",
            len(rng_states),
            world_size,
        )
    if rank < len(rng_states):
        restore_rng_state(rng_states[rank])
    else:
        seed_everything(hash((iteration, rank)) % 2**32)
