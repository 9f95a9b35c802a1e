"""The error boundary every command-line entry point shares (the stage scripts and ``tools/``).

A mistake in what the user gave (config, data, weights, output folder, ...) raises one of
:func:`user_errors`; the boundary prints ``<script>: error: <message>`` to stderr and returns exit status 2,
without a traceback unless ``--debug`` is on the command line or ``PASSREID_DEBUG=1`` is set. Any other
exception is a bug: its traceback is shown as usual. Either way, when the run has a log file (a stage's
``<output-dir>/log.txt``, opened by :func:`passreid.engine.setup_logging`), the reason it stopped is
appended there, with the traceback for an unexpected error.

    @error_boundary
    def main(argv: Sequence[str] | None = None) -> int:
        ...

    if __name__ == "__main__":
        sys.exit(main())

This module imports torch only when an error is handled, so that light tools stay light.
"""
from __future__ import annotations

import functools
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from passreid.config import DEBUG_ENV, DEBUG_FLAG

__all__ = ["USER_ERROR_EXIT_STATUS", "debug_requested", "describe_error", "error_boundary", "last_reported_error",
           "run_training_command", "user_errors"]

USER_ERROR_EXIT_STATUS = 2
_reported: list[str] = []  # user errors reported in this process (a submitit job quotes the last, launch/submit.py)

Main = TypeVar("Main", bound=Callable[..., int])


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that report a problem with the user's input or environment, each with a message that
    names what was expected and where. OSError covers missing, unreadable or unwritable files and a full
    disk; NonFiniteLossError is a diverged run and NoClustersError a clustering with no cluster, their
    messages say what to change."""
    from passreid.cluster import NoClustersError
    from passreid.config import ConfigError
    from passreid.data import CorruptImageError, DatasetFormatError, DatasetLayoutError
    from passreid.data.masks import MaskFileError
    from passreid.engine import CheckpointCorruptError, CheckpointStateError, NonFiniteLossError
    from passreid.eval import EvaluationInputError
    from passreid.models import ArchitectureError, CheckpointFormatError, CheckpointMismatchError

    return (ConfigError,
            DatasetLayoutError, DatasetFormatError, CorruptImageError, MaskFileError,
            CheckpointFormatError, CheckpointMismatchError, ArchitectureError, CheckpointCorruptError,
            CheckpointStateError,
            EvaluationInputError,
            NonFiniteLossError, NoClustersError,
            OSError)


def last_reported_error() -> str | None:
    """The message of the last user error an entry point reported in this process (``None`` if none)."""
    return _reported[-1] if _reported else None


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` among the options (before a ``--``), or ``PASSREID_DEBUG`` set to anything but 0."""
    options = list(argv)
    if "--" in options:
        options = options[:options.index("--")]
    return DEBUG_FLAG in options or os.environ.get(DEBUG_ENV, "0") not in ("", "0")


# How a DataLoader re-raises a worker's error: this header, the worker's traceback, then "<type>: <message>".
_WORKER_ERROR = re.compile(r"^Caught (?P<type>\w+) in DataLoader (?P<where>worker process \d+)\.\n"
                           r"Original Traceback \(most recent call last\):\n")


def describe_error(error: BaseException) -> str:
    """The message of a user error; an OS error as ``<file>: <reason>`` (Python's own form starts with
    ``[Errno N]``); an error re-raised from a DataLoader worker as its original message, without the
    worker's traceback."""
    if isinstance(error, OSError) and error.strerror:
        files = [str(name) for name in (error.filename, error.filename2) if name is not None]
        return f"{' -> '.join(files)}: {error.strerror}" if files else error.strerror
    message = str(error) or type(error).__name__
    header = _WORKER_ERROR.match(message)
    if header:
        # The last "<type>: " line starts the original message (earlier ones belong to chained causes).
        starts = [line.start(1) for line in re.finditer(rf"^(?:[\w.]+\.)?{header['type']}: (.)", message,
                                                         re.MULTILINE)]
        if starts:
            return f"{message[starts[-1]:].strip()} (in a data-loading {header['where']})"
    return message


def _script_label(path: Path) -> str:
    """``finetune/train.py`` for a script (its folder and name), ``passreid-finetune`` for a console command."""
    return f"{path.parent.name}/{path.name}" if path.suffix == ".py" else path.name


def _program_name(function: Callable[..., object], declared: str | None, from_command_line: bool) -> str:
    """The name the user typed when ``main`` runs from the command line (``python finetune/train.py`` or the
    console command ``passreid-finetune``); otherwise (``python -m``, a call from Python) the declared name,
    or the file that defines ``main``."""
    invoked = Path(sys.argv[0]) if from_command_line and sys.argv and sys.argv[0] else None
    if invoked is not None and invoked.name != "__main__.py" and invoked.name not in ("-c", "-m"):
        return _script_label(invoked)
    return declared or _script_label(Path(function.__code__.co_filename))


def _record_in_run_log(message: str) -> None:
    from passreid.engine.logger import append_to_run_log

    append_to_run_log(message)


def error_boundary(main: Main | None = None, *, extra: tuple[type[BaseException], ...] = (),
                   program: str | None = None) -> Main | Callable[[Main], Main]:
    """Decorate an entry point's ``main(argv=None) -> int`` (see the module docstring).

    ``extra``: more exception types a tool reports as bad input (its own error class, say).
    ``program``: the name messages use when ``main`` is not run as a script (a stage command's
    ``finetune/train.py``); by default the file that defines ``main``.
    """
    def decorate(function: Main) -> Main:
        @functools.wraps(function)
        def run(argv: Sequence[str] | None = None) -> int:
            name = _program_name(function, declared=program, from_command_line=argv is None)
            try:
                return function(argv)
            except Exception as error:
                if not isinstance(error, user_errors() + extra):
                    _record_in_run_log(f"{name} stopped by an unexpected error:\n"
                                       f"{traceback.format_exc().rstrip()}")
                    raise
                message = describe_error(error)
                _reported.append(message)
                if debug_requested(sys.argv[1:] if argv is None else argv):
                    traceback.print_exc()
                print(f"{name}: error: {message}", file=sys.stderr)
                _record_in_run_log(f"{name} stopped: {message}")
                return USER_ERROR_EXIT_STATUS
            except KeyboardInterrupt:
                _record_in_run_log(f"{name} stopped: interrupted (KeyboardInterrupt)")
                raise

        return run  # type: ignore[return-value]

    return decorate(main) if main is not None else decorate


def run_training_command(argv: Sequence[str] | None, description: str, schema: type,
                         run: Callable[..., Any], validate: Callable[[Any], Any],
                         report: Callable[[Any], None] | None = None) -> int:
    """The body of a training stage's command: parse the command line into ``schema`` and ``validate`` it
    (``--print-config`` prints it and stops: a config it prints is one the stage accepts, which is what the
    launchers check before queueing a job), ``run(cfg, resume=...)`` the stage, and requeue the SLURM job when
    a pre-emption signal stopped it (the result says ``preempted``; rank 0 requeues). Rank 0 then passes the
    result to ``report`` when one is given (after the process group has ended)."""
    from passreid import dist
    from passreid.config import default_argument_parser, parse_and_load, print_config
    from passreid.engine import requeue_current_job

    args, cfg = parse_and_load(schema, argv, default_argument_parser(description))
    validate(cfg)
    if args.print_config:
        return print_config(cfg)
    try:
        result = run(cfg, resume=not args.no_resume)
        is_main = dist.is_main_process()
    finally:
        # A process group left to the interpreter's exit can abort the process ("terminate called without an
        # active exception" from gloo's threads): a finished job would then end FAILED and cancel its afterok
        # dependants.
        dist.destroy()
    if is_main:
        if result.preempted:
            requeue_current_job()
        if report is not None:
            report(result)
    return 0
