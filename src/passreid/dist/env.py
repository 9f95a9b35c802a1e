"""Where this process sits in a distributed job: torchrun, a SLURM step, or alone.

Pure functions of an environment mapping, so every rule is testable without a cluster.

Resolution order (:func:`resolve_dist_env`):

1. **torchrun**: all of ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
   ``MASTER_PORT`` are set. This wins even inside a SLURM allocation, so ``torchrun`` started
   by one ``srun`` task per node gets torchrun's ranks, not SLURM's.
2. **SLURM step**: ``SLURM_PROCID`` and ``SLURM_STEP_NUM_TASKS`` are set, i.e. the process
   was started by ``srun`` (submitit launches this way too). world size = the *step's* task
   count, rank = ``SLURM_PROCID``, local rank = ``SLURM_LOCALID``, master = first host of the
   step's node list, port = ``20000 + SLURM_JOB_ID % 20000`` so every task agrees without
   talking. ``MASTER_ADDR`` / ``MASTER_PORT`` in the environment override the derived values.
3. **single process**: rank 0 of 1 on ``127.0.0.1`` (port ``MASTER_PORT`` or 29500; no
   process group is created for one process, so the port is never bound).

The batch step of ``sbatch --ntasks=8`` runs ``python train.py`` once, with
``SLURM_PROCID=0`` and ``SLURM_NTASKS=8`` but without srun's ``SLURM_STEP_*`` variables.
Trusting ``SLURM_NTASKS`` there would make rank 0 wait forever for seven processes that were
never started, so such a process runs alone, with a warning that says to launch with srun.
"""
from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_TORCHRUN_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SINGLE_PROCESS_ADDR = "127.0.0.1"
SINGLE_PROCESS_PORT = 29500
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000
_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")

Source = Literal["torchrun", "slurm", "single"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job and the rendezvous point of rank 0."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: Source

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if not 0 <= self.local_rank < self.world_size:
            raise ValueError(f"local_rank must be in [0, {self.world_size}), got {self.local_rank}")
        if not 1 <= self.master_port <= 65535:
            raise ValueError(f"master_port must be in [1, 65535], got {self.master_port}")
        if not self.master_addr:
            raise ValueError("master_addr must not be empty")

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def resolve_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Work out rank, world size and rendezvous from ``environ`` (default: ``os.environ``).

    See the module docstring for the order. Raises ValueError naming the variable when a
    value is malformed, and when torchrun's variables are only partly set outside SLURM.
    """
    env = os.environ if environ is None else environ
    present = [name for name in TORCHRUN_VARS if _get(env, name) is not None]
    if len(present) == len(TORCHRUN_VARS):
        return _torchrun_env(env)
    partial_ranks = [name for name in _TORCHRUN_RANK_VARS if name in present]
    if _get(env, "SLURM_PROCID") is not None:
        if partial_ranks:
            warnings.warn(f"ignoring {', '.join(partial_ranks)}: the torchrun variables are only "
                          f"partly set, using the SLURM task's ranks instead", RuntimeWarning,
                          stacklevel=2)
        return _slurm_env(env)
    if partial_ranks:
        missing = [name for name in TORCHRUN_VARS if name not in present]
        raise ValueError(f"incomplete torchrun environment: {', '.join(present)} set but "
                         f"{', '.join(missing)} missing; launch with torchrun, or set all of "
                         f"{', '.join(TORCHRUN_VARS)}")
    return _single_env(env)


def slurm_master_port(job_id: int) -> int:
    """Port every task of SLURM job ``job_id`` derives alike: ``20000 + job_id % 20000``."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: ``"gpu[01-04,07],cpu1"`` -> ``['gpu01', ..., 'gpu07', 'cpu1']``.

    Zero padding of a range is kept (width of its lower bound), several bracket groups in one
    name expand as a product (``r[1-2]n[1-2]`` -> ``r1n1, r1n2, r2n1, r2n2``), and the order
    is the order written. Raises ValueError on empty names, unbalanced or nested brackets,
    empty groups and descending or non-numeric ranges.
    """
    if not isinstance(nodelist, str):
        raise TypeError(f"nodelist must be a string, got {type(nodelist).__name__}")
    text = nodelist.strip()
    if not text:
        raise ValueError("empty node list")
    hosts: list[str] = []
    for name in _split_top_level(text):
        hosts.extend(_expand_host(name, nodelist))
    return hosts


# ----------------------------------------------------------------------------------------------


def _torchrun_env(env: Mapping[str, str]) -> DistEnv:
    world_size = _int_var(env, "WORLD_SIZE", minimum=1)
    rank = _int_var(env, "RANK", minimum=0)
    local_rank = _int_var(env, "LOCAL_RANK", minimum=0)
    _check_rank(rank, world_size, "RANK", "WORLD_SIZE")
    return DistEnv(rank, world_size, local_rank, _addr_var(env, "MASTER_ADDR"),
                   _port_var(env, "MASTER_PORT"), "torchrun")


def _slurm_env(env: Mapping[str, str]) -> DistEnv:
    step_tasks = _get(env, "SLURM_STEP_NUM_TASKS")
    if step_tasks is None:
        return _batch_step_env(env)
    world_size = _int_var(env, "SLURM_STEP_NUM_TASKS", minimum=1)
    rank = _int_var(env, "SLURM_PROCID", minimum=0)
    _check_rank(rank, world_size, "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")
    if _get(env, "SLURM_LOCALID") is None:
        raise ValueError("SLURM_LOCALID is not set although SLURM_PROCID is; "
                         "was this process started by srun?")
    local_rank = _int_var(env, "SLURM_LOCALID", minimum=0)
    return DistEnv(rank, world_size, local_rank, _slurm_master_addr(env), _slurm_port(env), "slurm")


def _batch_step_env(env: Mapping[str, str]) -> DistEnv:
    tasks = _get(env, "SLURM_NTASKS")
    if tasks is not None and tasks.isdigit() and int(tasks) > 1:
        warnings.warn(f"SLURM allocation has SLURM_NTASKS={tasks} but this process was not "
                      f"started by srun (no SLURM_STEP_NUM_TASKS): running as a single process. "
                      f"Use `srun python ...` to start one process per task.", RuntimeWarning,
                      stacklevel=3)
    return _single_env(env)


def _single_env(env: Mapping[str, str]) -> DistEnv:
    addr = _addr_var(env, "MASTER_ADDR") if _get(env, "MASTER_ADDR") else SINGLE_PROCESS_ADDR
    port = _port_var(env, "MASTER_PORT") if _get(env, "MASTER_PORT") else SINGLE_PROCESS_PORT
    return DistEnv(0, 1, 0, addr, port, "single")


def _slurm_master_addr(env: Mapping[str, str]) -> str:
    if _get(env, "MASTER_ADDR") is not None:
        return _addr_var(env, "MASTER_ADDR")
    for name in _NODELIST_VARS:
        value = _get(env, name)
        if value is not None:
            try:
                return expand_nodelist(value)[0]
            except ValueError as err:
                raise ValueError(f"{name}={value!r}: {err}") from None
    raise ValueError(f"cannot find the master host: none of {', '.join(_NODELIST_VARS)} or "
                     f"MASTER_ADDR is set")


def _slurm_port(env: Mapping[str, str]) -> int:
    if _get(env, "MASTER_PORT") is not None:
        return _port_var(env, "MASTER_PORT")
    for name in ("SLURM_JOB_ID", "SLURM_JOBID"):
        if _get(env, name) is not None:
            return slurm_master_port(_int_var(env, name, minimum=0))
    raise ValueError("cannot derive the master port: neither SLURM_JOB_ID nor MASTER_PORT is set")


def _get(env: Mapping[str, str], name: str) -> str | None:
    """The stripped value of ``name``; an empty string counts as unset."""
    value = env.get(name)
    if value is None or not str(value).strip():
        return None
    return str(value).strip()


def _int_var(env: Mapping[str, str], name: str, minimum: int) -> int:
    raw = _get(env, name)
    try:
        value = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {env.get(name)!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _port_var(env: Mapping[str, str], name: str) -> int:
    port = _int_var(env, name, minimum=1)
    if port > 65535:
        raise ValueError(f"{name} must be a TCP port in [1, 65535], got {port}")
    return port


def _addr_var(env: Mapping[str, str], name: str) -> str:
    value = _get(env, name)
    if value is None or any(ch.isspace() for ch in value):
        raise ValueError(f"{name} must be a host name or IP address, got {env.get(name)!r}")
    return value


def _check_rank(rank: int, world_size: int, rank_name: str, world_name: str) -> None:
    if rank >= world_size:
        raise ValueError(f"{rank_name}={rank} is not below {world_name}={world_size}")


_HOST_CHARS = re.compile(r"[A-Za-z0-9._\-]*")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_HOST_PIECE = re.compile(r"([^\[\]]*)(\[([^\]]*)\])?")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    names, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise ValueError(f"nested '[' at position {i} in node list {text!r}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise ValueError(f"']' without '[' at position {i} in node list {text!r}")
            depth = 0
        elif ch == "," and not depth:
            names.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unclosed '[' in node list {text!r}")
    names.append(text[start:])
    for name in names:
        if not name.strip():
            raise ValueError(f"empty host name in node list {text!r}")
    return [name.strip() for name in names]


def _expand_host(name: str, whole: str) -> list[str]:
    """All hosts for one name with zero or more bracket groups."""
    expansions = [""]
    for match in _HOST_PIECE.finditer(name):
        literal, bracket, group = match.group(1), match.group(2), match.group(3)
        if not _HOST_CHARS.fullmatch(literal):
            raise ValueError(f"invalid character in host name {name!r} of node list {whole!r}")
        options = _expand_group(group, name, whole) if bracket is not None else [""]
        expansions = [prefix + literal + option for prefix in expansions for option in options]
    return expansions


def _expand_group(group: str, name: str, whole: str) -> list[str]:
    if not group.strip():
        raise ValueError(f"empty [] in host {name!r} of node list {whole!r}")
    values: list[str] = []
    for part in group.split(","):
        match = _RANGE.fullmatch(part.strip())
        if not match:
            raise ValueError(f"bad range {part!r} in host {name!r} of node list {whole!r}: "
                             f"expected N or N-M with digits")
        low_text, high_text = match.group(1), match.group(2)
        if high_text is None:
            values.append(low_text)
            continue
        low, high = int(low_text), int(high_text)
        if low > high:
            raise ValueError(f"descending range {part!r} in host {name!r} of node list {whole!r}")
        width = len(low_text)
        values.extend(f"{n:0{width}d}" for n in range(low, high + 1))
    return values
