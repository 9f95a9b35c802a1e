#!/usr/bin/env python
"""Evaluate a fine-tuned checkpoint on a config's test set (see finetune/README.md).

    python finetune/test.py --config-file configs/finetune/market1501/pass_vit_s_256.yaml \
        --weights runs/market_pass_s/model_final.pth --data-root /data [--output-dir D] [key=value ...]

Writes D/metrics.json, D/query_features.npz and D/gallery_features.npz (default D: <weights dir>/test).
Without --config-file, a passreid model_final.pth / checkpoint.pth is evaluated with the config stored
in it (overrides still apply). Released TransReID / PASS-reID, DPM, TSD, DPEFormer and BPBReID checkpoints
need the --config-file that describes their architecture; every key that does not map is reported and refused
unless allowed with --allow-missing / --allow-unexpected (fnmatch patterns).
--print-config prints the resolved config and exits; a mistake in the input is one message and exit
status 2 (--debug adds the traceback).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from passreid.cli import error_boundary
from passreid.config import (Layer, build_config, default_argument_parser, overrides_to_layers, parse_and_load,
                             print_config)
from passreid.finetune import FinetuneConfig
from passreid.finetune.checkpoints import stored_config
from passreid.finetune.testing import run_test


@error_boundary
def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate ``--weights`` and write the metrics and features."""
    parser = default_argument_parser(__doc__)
    parser.add_argument("--weights", required=True, metavar="FILE",
                        help="model_final.pth, a run's checkpoint.pth, or a released fine-tuned checkpoint")
    parser.add_argument("--allow-missing", nargs="*", default=[], metavar="PATTERN",
                        help="model keys a published checkpoint may lack")
    parser.add_argument("--allow-unexpected", nargs="*", default=[], metavar="PATTERN",
                        help="published checkpoint keys that may be left unused")
    args, cfg = parse_and_load(FinetuneConfig, argv, parser)
    if args.config_file is None:
        layers = [Layer(f"{args.weights} (stored config)", stored_config(args.weights))]
        if args.data_root is not None:
            layers.append(Layer("--data-root", {"data": {"root": args.data_root}}))
        cfg = build_config(FinetuneConfig, layers + overrides_to_layers(FinetuneConfig, args.opts))
    if args.print_config:
        return print_config(cfg)
    output_dir = args.output_dir or str(Path(args.weights).expanduser().absolute().parent / "test")
    run_test(args.weights, cfg, output_dir, allow_missing=args.allow_missing,
             allow_unexpected=args.allow_unexpected)
    return 0


if __name__ == "__main__":
    sys.exit(main())
