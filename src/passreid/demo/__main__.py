"""Render the demo worlds, or print the arguments that point a stage's demo recipe at them.

    python -m passreid.demo --out DIR [--world NAME ...]     # render into DIR/<name>/ (all by default)
    python -m passreid.demo --out DIR --arguments-for STAGE  # print STAGE's data arguments, one per line
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from passreid.demo import DEMO_STAGE_DATA, DEMO_WORLDS, demo_data_arguments, render_demo_world


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m passreid.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder that holds one sub-folder per world")
    parser.add_argument("--world", action="append", choices=sorted(DEMO_WORLDS),
                        help="a world to render (repeatable; default: all)")
    parser.add_argument("--arguments-for", choices=sorted(DEMO_STAGE_DATA), metavar="STAGE",
                        help="print the stage's data arguments instead of rendering")
    args = parser.parse_args(argv)
    if args.arguments_for:
        print("\n".join(demo_data_arguments(args.arguments_for, args.out)))
        return 0
    for name in args.world or list(DEMO_WORLDS):
        print(f"{name}: {render_demo_world(name, args.out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
