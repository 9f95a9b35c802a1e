"""Rank a gallery of images for query images with a trained model; write an HTML page and PNG strips.

    python tools/search.py --weights runs/market/model_final.pth --query q.jpg --gallery gallery/ --out report.html
    python tools/search.py --weights model_final.pth --query queries/ --gallery gallery/ --topk 10 --out r.html

``--query`` / ``--gallery``: an image, a folder (sorted, not recursive) or a quoted glob; ``--gallery`` may also be
a feature file of ``tools/extract_features.py`` (``gallery.npz``: extracted once, searched many times; its
features must have this model's size, and a file that names another model is used with a warning). Writes

* ``report.html``: one row per query with its top-k gallery images and their distances (self-contained:
  thumbnails are embedded); frames are green / red when both names follow Market-1501 naming
  (``<pid>_c<camera>...``), so identities are known, grey otherwise;
* ``report_strips/<n>_<query name>.png``: the same row as one image;
* ``report.json``: the ranked file names and distances per query.

The distance is the model's test distance (a fine-tuning method's own one when it has one, else the
L2-normalised squared Euclidean distance). ``--exclude-same-camera`` drops gallery images of the query's
identity seen by the query's camera (the Market-1501 evaluation protocol). Exit status 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from passreid.atomic_files import atomic_write_text
from passreid.cli import error_boundary
from passreid.config import add_debug_flag
from passreid.inference import (CLI_ERRORS, add_model_arguments, extracted, list_images, load_model_from_args,
                                parse_market_names)
from passreid.eval.feature_file import FeatureFile, read_feature_file
from passreid.eval.features import ExtractedFeatures
from passreid.visualization import RankHit, RankRow, format_distance, rank_gallery, rank_strip, write_rank_html


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--query", required=True, help="query image, folder or quoted glob")
    parser.add_argument("--gallery", required=True,
                        help="gallery image, folder or quoted glob, or a .npz feature file of "
                             "tools/extract_features.py")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True, help="HTML page to write (PNG strips and JSON next to it)")
    parser.add_argument("--exclude-same-camera", action="store_true",
                        help="skip gallery images with the query's identity and camera (needs Market-1501 names)")
    add_debug_flag(parser)
    return parser


def _stem(path: str) -> str:
    return Path(path).stem


def _gallery_source(gallery: str) -> tuple[list[str], tuple | None, FeatureFile | None]:
    """Image paths and Market-1501 labels of ``--gallery``, and its stored features when it is a feature file
    (``tools/extract_features.py``: the gallery is then not extracted again)."""
    if not (gallery.endswith(".npz") and Path(gallery).is_file()):
        paths = list_images(gallery)
        return paths, parse_market_names(paths), None
    stored = read_feature_file(gallery, require=("paths",))
    labels = (stored.pids, stored.camids) if stored.pids is not None and stored.camids is not None else None
    return stored.paths, labels, stored


def _check_stored_gallery(gallery: str, stored: FeatureFile, model, feature_dim: int) -> None:
    """Stored gallery features must come from the search's model: the same size; another model's name warns."""
    if stored.feats.shape[1] != feature_dim:
        raise ValueError(f"--gallery {gallery}: its features are {stored.feats.shape[1]}-D, this model's are "
                         f"{feature_dim}-D; extract the gallery with the model of --weights")
    if stored.model is not None and stored.model != model.describe():
        print(f"warning: --gallery {gallery} was extracted by\n  {stored.model}\nthis search runs\n  "
              f"{model.describe()}\ndistances are meaningful only if that is the same model", file=sys.stderr)


def _check_hits_exist(gallery: str, paths: list[str], ranked) -> None:
    """The images a stored gallery names for the hits to show must still be there (only those are read: a
    gallery file may name millions)."""
    shown = sorted({int(g) for result in ranked for g in result.indices})
    missing = [paths[g] for g in shown if not Path(paths[g]).is_file()]
    if missing:
        raise FileNotFoundError(f"--gallery {gallery}: {len(missing)} of the {len(shown)} gallery images to show "
                                f"are not there (first: {missing[0]}); were they moved after extraction?")


def _features(extractor, paths: list[str], labels: tuple | None, split: str) -> ExtractedFeatures:
    if extractor.model.uses_cameras and labels is None:
        raise ValueError(f"this model uses SIE camera embeddings, but the {split} file names carry no camera ids")
    return extracted(extractor(paths, camids=labels[1] if extractor.model.uses_cameras else None),
                     *(labels or (None, None)))


def search(args: argparse.Namespace) -> dict:
    """Rank, write the page, strips and JSON; returns the JSON record."""
    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    if args.out.parent.exists() and not args.out.parent.is_dir():
        raise NotADirectoryError(f"--out {args.out}: {args.out.parent} is not a folder")
    args.out.parent.mkdir(parents=True, exist_ok=True)  # before the model runs: a read-only place fails at once
    query_paths = list_images(args.query)
    query_labels = parse_market_names(query_paths)
    gallery_paths, gallery_labels, stored = _gallery_source(args.gallery)
    known = query_labels is not None and gallery_labels is not None
    if args.exclude_same_camera and not known:
        raise ValueError("--exclude-same-camera needs identities and cameras from Market-1501 file names "
                         "(<pid>_c<camera>...) for both the query and the gallery images")
    extractor = load_model_from_args(args)
    model = extractor.model
    print(model.describe())
    query = _features(extractor, query_paths, query_labels, "query")
    if stored is None:
        gallery = _features(extractor, gallery_paths, gallery_labels, "gallery")
    else:
        _check_stored_gallery(args.gallery, stored, model, query.feats.shape[1])
        gallery = extracted(stored.feats, *(gallery_labels or (None, None)))
    exclude = None
    if args.exclude_same_camera:
        def exclude(q: int) -> np.ndarray:
            return (gallery.pids == query.pids[q]) & (gallery.camids == query.camids[q])
    ranked = rank_gallery(model.test_distance(query, gallery, extractor.device), len(query_paths), args.topk,
                          exclude=exclude)
    if stored is not None:
        _check_hits_exist(args.gallery, gallery_paths, ranked)
    strips = args.out.parent / f"{args.out.stem}_strips"
    strips.mkdir(exist_ok=True)
    rows, record = [], {"weights": str(args.weights), "model": model.describe(), "queries": []}
    for q, result in enumerate(ranked):
        matches = [bool(query.pids[q] == gallery.pids[g]) if known else None for g in result.indices]
        hits = [RankHit(gallery_paths[g], _stem(gallery_paths[g]), float(d), m)
                for g, d, m in zip(result.indices, result.distances, matches)]
        rows.append(RankRow(query_paths[q], _stem(query_paths[q]), hits))
        strip = rank_strip(query_paths[q], [(h.image, format_distance(h.distance), h.match) for h in hits])
        strip.save(strips / f"{q:04d}_{_stem(query_paths[q])}.png")
        record["queries"].append({"query": query_paths[q], "ranked": [
            {"path": h.image, "distance": h.distance, "same_identity": h.match} for h in hits]})
    notes = [model.describe(), f"{len(query_paths)} queries, {len(gallery_paths)} gallery images, top {args.topk}"]
    write_rank_html(rows, args.out, title="passreid search", notes=notes)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    return record


@error_boundary(extra=CLI_ERRORS)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    record = search(args)
    print(f"wrote {args.out} ({len(record['queries'])} query rows), {args.out.parent / (args.out.stem + '_strips')}/, "
          f"{args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
