"""Build a `data.occluder_dir` folder (RGBA *.png cut-outs) from cut-outs on a black background.

DPEFormer's realistic occlusion augmentation pastes SAM segments of SA-1B. Its authors publish the crops as
"SA-1B-crop" (a Google Drive file linked from the README of zhangxin06/DPEFormer): a folder of sub-folders, each
holding RGB crops that are black outside the segment (read by model/SAM.py, SAM_model_no_json). Download and
unpack it, then:

    python tools/prepare_occluders.py --source /data/SA-1B-crop --output /data/SA-1B-occluders
    python finetune/train.py --config-file configs/finetune/occluded_duke/dpeformer_vit_b_256.yaml \\
        data.occluder_dir=/data/SA-1B-occluders ...

Every image under --source (any depth) becomes <output>/<sub-folder>__<name>.png, opaque where a pixel is not
pure black (0, 0, 0), cropped to its opaque box; all-black images are skipped and counted.
"""
from __future__ import annotations

import argparse
import sys

from passreid.cli import error_boundary
from passreid.config import add_debug_flag
from passreid.data.occluders import cutouts_from_black_background


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="folder of cut-outs on black (e.g. the unpacked SA-1B-crop)")
    parser.add_argument("--output", required=True, help="folder to write the RGBA *.png cut-outs to")
    add_debug_flag(parser)
    return parser.parse_args(argv)


@error_boundary(extra=(ValueError,))
def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the process exit status (2 for a missing or unusable source)."""
    args = parse_args(argv)
    summary = cutouts_from_black_background(args.source, args.output)
    print(f"wrote {summary.written} RGBA cut-outs to {args.output}; skipped {len(summary.all_black)} all-black and "
          f"{len(summary.unreadable)} unreadable image(s)")
    for name in summary.unreadable:
        print(f"  unreadable: {name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
