"""Ranked lists of an evaluated split from saved features: HTML page, PNG strips, attention and part maps.

    python finetune/test.py --weights runs/market/model_final.pth --output-dir runs/market/test
    python tools/visualize_ranks.py --query-features runs/market/test/query_features.npz \
        --gallery-features runs/market/test/gallery_features.npz \
        --weights runs/market/model_final.pth --out runs/market/ranks

Features are the ``feats`` / ``pids`` / ``camids`` .npz files of ``finetune/test.py`` or
``tools/extract_features.py``. Image paths come from the files' ``paths`` when present, otherwise from the
``--dataset`` / ``--data-root`` split (query and gallery, in reader order; counts, pids and camids are
checked against the features). Gallery images of the query's identity seen by the query's camera are
skipped, as in the evaluation (``--keep-same-camera`` shows them).

With ``--weights`` (the model the features came from):

* the distance is the model's test distance (a fine-tuning method's own one when it has one); without it,
  the squared Euclidean distance of L2-normalised features;
* ``maps/<n>_<query>.png``: for the query and each shown gallery image, the last-block attention of the
  [CLS] and part tokens to the patches (ViT models), or the model's own part heatmaps when it defines
  ``visual_parts`` (BPBReID-style part models; see ``passreid.visualization``);
* per-part distances under each gallery image (PASS part tokens or the model's parts; ``n/a`` when a
  part is not visible in both images).

Writes ``<out>/index.html`` (one row per query) and ``<out>/strips/<n>_<query>.png``. Exit status 2 on bad
input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from passreid.cli import error_boundary
from passreid.config import add_debug_flag
from passreid.data import build_dataset, read_image
from passreid.eval.distance import FeatureDistance
from passreid.eval.feature_file import read_feature_file
from passreid.eval.features import ExtractedFeatures
from passreid.inference import CLI_ERRORS, BACKBONE_FEATURES, FeatureExtractor, LoadedModel
from passreid.visualization import (PartView, RankHit, RankRow, format_distance, format_part_distances,
                                    heatmap_overlay, part_distances, part_view, rank_gallery, rank_strip,
                                    write_rank_html)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--query-features", type=Path, required=True, help="query .npz (feats, pids, camids)")
    parser.add_argument("--gallery-features", type=Path, required=True, help="gallery .npz (feats, pids, camids)")
    parser.add_argument("--dataset", default=None, help="dataset reader (market1501, dukemtmcreid, ...) giving the "
                                                        "image paths when the .npz files hold none")
    parser.add_argument("--data-root", default=None, help="root folder of --dataset")
    parser.add_argument("--weights", default=None, help="the model the features came from: its test distance, "
                                                        "attention / part maps and per-part distances")
    parser.add_argument("--config-file", default=None, help="config of a published TransReID/PASS checkpoint")
    parser.add_argument("--backbone-feature", choices=BACKBONE_FEATURES, default="pass_fusion")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--num-queries", type=int, default=10, help="queries shown, evenly spread over the split")
    parser.add_argument("--query-indices", type=int, nargs="*", default=None, help="exact query indices to show")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--keep-same-camera", action="store_true",
                        help="also show gallery images of the query's identity from the query's camera")
    add_debug_flag(parser)
    return parser


def load_features(path: Path) -> tuple[ExtractedFeatures, list[str] | None]:
    """Features, labels and (when stored) image paths of one feature file; errors name the file and the key."""
    stored = read_feature_file(path, require=("pids", "camids"))
    return ExtractedFeatures(stored.feats, stored.pids, stored.camids), stored.paths


def _split_paths(args: argparse.Namespace, split: str, feats: ExtractedFeatures, items) -> list[str]:
    pids = np.array([item.pid for item in items])
    camids = np.array([item.camid for item in items])
    if len(items) != len(feats.pids) or not (np.array_equal(pids, feats.pids) and np.array_equal(camids, feats.camids)):
        raise ValueError(f"the {split} features ({len(feats.pids)} rows) do not match the {split} split of "
                         f"{args.dataset} at {args.data_root} ({len(items)} images) in order, pids and camids; "
                         "were they extracted from another split or a subset (data.max_test_ids)?")
    return [item.path for item in items]


def resolve_paths(args, query: ExtractedFeatures, query_paths, gallery: ExtractedFeatures, gallery_paths):
    """Image paths of both splits: from the .npz files, else from the dataset split."""
    if query_paths is not None and gallery_paths is not None:
        return query_paths, gallery_paths
    if args.dataset is None or args.data_root is None:
        raise ValueError("the feature files hold no 'paths': pass --dataset and --data-root of the split they "
                         "were extracted from")
    dataset = build_dataset(args.dataset, args.data_root)
    return (query_paths or _split_paths(args, "query", query, dataset.query),
            gallery_paths or _split_paths(args, "gallery", gallery, dataset.gallery))


def chosen_queries(args: argparse.Namespace, num_query: int) -> list[int]:
    if args.query_indices:
        bad = [i for i in args.query_indices if not 0 <= i < num_query]
        if bad:
            raise ValueError(f"--query-indices {bad} outside 0..{num_query - 1}")
        return list(args.query_indices)
    if args.num_queries < 1:
        raise ValueError(f"--num-queries must be >= 1, got {args.num_queries}")
    count = min(args.num_queries, num_query)
    return sorted({int(i) for i in np.linspace(0, num_query - 1, count).round()})


def map_grid(model: LoadedModel, paths: list[str], camids: np.ndarray,
             captions: list[str]) -> tuple[Image.Image, PartView | None]:
    """Rows = images (query first); columns = the image, then one overlay per map. Returns the grid and
    the :class:`~passreid.visualization.PartView` (for per-part distances)."""
    images = model.prepare(paths).to(model.device)
    cams = torch.as_tensor(camids, dtype=torch.long, device=model.device) if model.uses_cameras else None
    view = part_view(model, images, cams)
    size = (128, 64)
    names = view.names if view is not None and view.maps is not None else []
    cell_w, cell_h, label_h = size[1] + 6, size[0] + 6, 14
    grid = Image.new("RGB", (cell_w * (2 + len(names)), label_h + cell_h * len(paths)), "white")
    draw = ImageDraw.Draw(grid)
    for column, name in enumerate(["image", *names]):
        draw.text((cell_w * (column + 1) + 3, 1), name[:12], fill="black")
    for row, (path, caption) in enumerate(zip(paths, captions)):
        top = label_h + row * cell_h
        draw.text((3, top + 3), caption[:10], fill="black")
        grid.paste(read_image(path).resize((size[1], size[0]), Image.BILINEAR), (cell_w + 3, top + 3))
        for column in range(len(names)):
            overlay = heatmap_overlay(path, view.maps[row, column].numpy(), size)
            grid.paste(overlay, (cell_w * (column + 2) + 3, top + 3))
    return grid, view


def visualize(args: argparse.Namespace) -> int:
    """Write the page, strips and maps; returns the number of query rows."""
    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    query, query_paths = load_features(args.query_features)
    gallery, gallery_paths = load_features(args.gallery_features)
    if query.feats.shape[1] != gallery.feats.shape[1]:
        raise ValueError(f"feature dimension differs: query D={query.feats.shape[1]}, "
                         f"gallery D={gallery.feats.shape[1]}")
    model = None
    if args.weights is not None:
        model = FeatureExtractor(args.weights, args.device, config=args.config_file,
                                 backbone_feature=args.backbone_feature).model
        print(model.describe())
    query_paths, gallery_paths = resolve_paths(args, query, query_paths, gallery, gallery_paths)
    if model is not None:
        distance = model.test_distance(query, gallery, model.device)
    else:
        distance = FeatureDistance(query.feats, gallery.feats, metric="euclidean", normalize=True)
    shown = chosen_queries(args, len(query_paths))
    # Rank only the shown queries: a sub-distance over their rows (the method's distance is row-wise).
    ranked_all = {}
    for q in shown:
        same_camera = (gallery.pids == query.pids[q]) & (gallery.camids == query.camids[q])
        ranked_all[q] = rank_gallery(lambda a, b, q=q: distance(q + a, q + b), 1, args.topk,
                                     exclude=None if args.keep_same_camera else lambda _, m=same_camera: m)[0]
    for sub in ("strips", "maps"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for n, q in enumerate(shown):
        result = ranked_all[q]
        name = Path(query_paths[q]).stem
        hits = [RankHit(gallery_paths[g], Path(gallery_paths[g]).stem, float(d), bool(gallery.pids[g] == query.pids[q]))
                for g, d in zip(result.indices, result.distances)]
        rank_strip(query_paths[q], [(h.image, format_distance(h.distance), h.match) for h in hits]).save(
            args.out / "strips" / f"{n:03d}_{name}.png")
        row = RankRow(query_paths[q], name, hits, details=[f"pid {query.pids[q]} cam {query.camids[q] + 1}"])
        if model is not None:
            paths = [query_paths[q]] + [gallery_paths[g] for g in result.indices]
            camids = np.concatenate([[query.camids[q]], gallery.camids[result.indices]])
            grid, view = map_grid(model, paths, camids, ["query"] + [f"#{k + 1}" for k in range(len(hits))])
            map_file = f"maps/{n:03d}_{name}.png"
            grid.save(args.out / map_file)
            row.extra_images.append((f"maps ({view.source if view else 'none'})", map_file))
            if view is not None and view.features is not None:
                for k, hit in enumerate(hits, start=1):
                    parts = part_distances(view, 0, view, k)
                    hit.details.append(format_part_distances(view.names, parts))
        rows.append(row)
    protocol = "same-camera matches kept" if args.keep_same_camera else "same identity + camera skipped"
    notes = [f"{len(query_paths)} queries x {len(gallery_paths)} gallery images; showing {len(shown)} queries, top "
             f"{args.topk}; {protocol}",
             model.describe() if model is not None else "distance: squared Euclidean of L2-normalised features"]
    write_rank_html(rows, args.out / "index.html", title="passreid ranked lists", notes=notes)
    return len(rows)


@error_boundary(extra=CLI_ERRORS)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    count = visualize(args)
    print(f"wrote {args.out / 'index.html'} ({count} query rows), {args.out / 'strips'}/, {args.out / 'maps'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
