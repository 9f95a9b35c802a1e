"""The command line every entry point shares.

``python finetune/train.py --config-file configs/finetune/market/vit_s.yaml --output-dir runs/x \\
--data-root /data/Market-1501 optim.lr=4e-4 model.arch=vit_base``

Options and ``key=value`` overrides may come in any order (``optim.lr=4e-4 --output-dir runs/x`` works).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from .errors import ConfigError
from .loader import build_config, dump_config, field_type, overrides_to_layers
from .yaml_io import Layer, load_yaml_layers

T = TypeVar("T")

# The flag and the environment variable that make passreid.cli.error_boundary print a user error's traceback.
DEBUG_FLAG = "--debug"
DEBUG_ENV = "PASSREID_DEBUG"

# Config keys that the convenience flags fill, first match in the schema wins.
OUTPUT_DIR_KEYS = ("output_dir", "train.output_dir")
DATA_ROOT_KEYS = ("data.root",)

_EPILOG = """\
key=value overrides are applied last (before or after the options), values parsed as YAML:
  optim.lr=4e-4  model.arch=vit_base  model.img_size=[384,128]  eval.rerank=true
an unknown key is an error that names the closest valid key. A mistake in the input (config, data,
weights, output folder) is one message and exit status 2; --debug or PASSREID_DEBUG=1 adds the traceback."""


def default_argument_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Parser with ``--config-file``, ``--output-dir``, ``--no-resume``, ``--data-root``, ``--print-config``,
    ``--debug`` and ``opts``.

    Entry points may add their own flags to the returned parser before parsing.
    """
    parser = argparse.ArgumentParser(description=description, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=None, metavar="FILE",
                        help="YAML recipe (may inherit others through _base_)")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="run folder: config.yaml, logs, checkpoints (sets the output_dir key)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start fresh even if DIR/checkpoint.pth exists (default: resume)")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="dataset folder (sets data.root)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit without running")
    add_debug_flag(parser)
    parser.add_argument("opts", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. optim.lr=4e-4")
    return parser


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Accept ``--debug`` (the error boundary reads it from the command line before parsing)."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"on an error, print the full traceback too (or set {DEBUG_ENV}=1)")


def parse_and_load(schema: type[T], argv: Sequence[str] | None = None,
                   parser: argparse.ArgumentParser | None = None) -> tuple[argparse.Namespace, T]:
    """Parse the command line and load the config it describes.

    Precedence, lowest first: schema defaults, ``--config-file`` (with its ``_base_`` chain),
    the flags ``--output-dir`` (written into ``output_dir``, or ``train.output_dir`` when the
    schema has no top-level ``output_dir``) and ``--data-root`` (written into ``data.root``),
    then the ``key=value`` overrides. Options and overrides may be intermixed; after ``--`` everything
    is an override. A flag whose key the schema lacks is a ConfigError rather than being dropped.

    Args:
        schema: the stage's config dataclass.
        argv: arguments without the program name (default: ``sys.argv[1:]``).
        parser: a parser from :func:`default_argument_parser`, possibly with extra flags.
    Returns:
        ``(args, cfg)``; ``args.no_resume`` tells the stage whether to skip auto-resume.
    """
    parser = parser or default_argument_parser()
    args = _parse_intermixed(parser, argv)
    layers = load_yaml_layers(args.config_file) if args.config_file else []
    layers += _flag_layers(schema, args)
    layers += overrides_to_layers(schema, args.opts)
    return args, build_config(schema, layers)


def _parse_intermixed(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_intermixed_args`` with everything after a ``--`` taken as ``opts`` as it is (argparse
    alone would still read an option there)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    head, tail = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser.parse_intermixed_args(head)
    args.opts = list(args.opts) + tail
    return args


def print_config(cfg: Any) -> int:
    """``--print-config``: write the resolved config to stdout as YAML (what ``config.yaml`` would hold);
    returns the exit status 0."""
    print(dump_config(cfg), end="")
    return 0


def _flag_layers(schema: type, args: argparse.Namespace) -> list[Layer]:
    layers = []
    for flag, value, keys in (("--output-dir", args.output_dir, OUTPUT_DIR_KEYS),
                              ("--data-root", args.data_root, DATA_ROOT_KEYS)):
        if value is None:
            continue
        key = next((k for k in keys if field_type(schema, k) is not None), None)
        if key is None:
            raise ConfigError(f"{flag} was given but {schema.__name__} has none of the keys "
                              f"{', '.join(keys)} to hold it")
        layers.append(Layer(flag, _nested(key, value)))
    return layers


def _nested(dotted_key: str, value: Any) -> dict[str, Any]:
    *parents, leaf = dotted_key.split(".")
    data: dict[str, Any] = {leaf: value}
    for part in reversed(parents):
        data = {part: data}
    return data
