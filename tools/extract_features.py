"""Extract test features of images with a trained model and save them as .npz.

    python tools/extract_features.py --weights runs/market/model_final.pth --images my_images/ --out feats.npz
    python tools/extract_features.py --weights backbone_final.pth --images 'data/**/*.jpg' --out feats.npz

``--images`` is an image file, a folder (its images, sorted by name; sub-folders are not searched) or a
quoted glob pattern (``**`` recursive). The feature file (``passreid.eval.feature_file``, written atomically to
exactly ``--out``) holds ``feats`` (N x D float32), ``paths`` (N strings), ``model`` (the model's one-line
description) and, when every file name follows Market-1501 / DukeMTMC naming (``<pid>_c<camera>...``), ``pids``
and ``camids`` (0-based), which makes it the feature file ``tools/evaluate.py`` reads. ``tools/search.py
--gallery`` takes it in place of a gallery folder, so a large gallery is extracted once. The model's own test
transform, feature and device are used (see ``passreid.inference``); SIE models need camera ids, taken from the
names.
Exit status 2 on bad input (missing file, wrong kind of checkpoint), with the reason.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from passreid.cli import error_boundary
from passreid.config import add_debug_flag
from passreid.eval.feature_file import FeatureFile, write_feature_file
from passreid.inference import CLI_ERRORS, add_model_arguments, list_images, load_model_from_args, parse_market_names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--images", required=True, help="image file, folder or quoted glob pattern")
    parser.add_argument("--out", type=Path, required=True, help=".npz file to write")
    add_debug_flag(parser)
    return parser


def extract(args: argparse.Namespace) -> FeatureFile:
    """What is written to ``--out``."""
    if not args.out.parent.is_dir():
        raise FileNotFoundError(f"output folder {args.out.parent} does not exist")
    paths = list_images(args.images)
    labels = parse_market_names(paths)
    extractor = load_model_from_args(args)
    print(extractor.model.describe())
    camids = labels[1] if labels is not None and extractor.model.uses_cameras else None
    if extractor.model.uses_cameras and camids is None:
        raise ValueError("this model uses SIE camera embeddings, but the file names carry no camera ids "
                         "(Market-1501 naming <pid>_c<camera>...)")
    start = time.time()
    feats = extractor(paths, camids=camids).numpy().astype(np.float32)
    print(f"{len(paths)} images -> features {feats.shape[0]} x {feats.shape[1]} in {time.time() - start:.1f}s "
          f"on {extractor.device}")
    return FeatureFile(feats, *(labels or (None, None)), paths=paths, model=extractor.model.describe())


@error_boundary(extra=CLI_ERRORS)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    extracted = extract(args)
    write_feature_file(args.out, extracted.feats, pids=extracted.pids, camids=extracted.camids,
                       paths=extracted.paths, model=extracted.model)
    labelled = "with pids/camids from Market-1501 naming" if extracted.pids is not None else \
        "without pids/camids (file names do not follow Market-1501 naming)"
    print(f"wrote {args.out}: feats, paths, model ({labelled})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
