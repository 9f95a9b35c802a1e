"""Evaluate saved query/gallery features: CMC, mAP and mINP under the Market-1501 protocol.

    python tools/evaluate.py --query query.npz --gallery gallery.npz --out metrics.json
    python tools/evaluate.py --query q.npz --gallery g.npz --rerank --k1 20 --k2 6 --lambda 0.3 --out m.json

Each ``.npz`` holds ``feats`` (N x D float), ``pids`` (N int) and ``camids`` (N int). The distance is
squared Euclidean on L2-normalised features by default (``--metric cosine``: 1 − cos;
``--no-normalize``: raw Euclidean). ``--rerank`` evaluates k-reciprocal re-ranking
(``passreid.eval.rerank.re_ranking``) of the L2-normalised features instead. Ties are broken by
gallery index (see ``passreid.eval.rank``). The JSON holds ``mAP``,
``mINP`` and ``cmc`` as fractions in [0, 1] (``cmc`` has ``min(max_rank, num_gallery)`` entries),
``num_valid_queries`` and ``params`` (everything needed to reproduce the numbers). Rows with pid -1 (junk,
which ``tools/extract_features.py`` keeps) are dropped from both splits before ranking, as the Market-1501
protocol does; ``params.junk_dropped`` and the output say how many.
Exit status 2 on bad input, with a message naming the problem and the file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from passreid.atomic_files import atomic_write_text
from passreid.cli import error_boundary
from passreid.config import add_debug_flag
from passreid.eval import EvaluationInputError, rank_metrics, rank_metrics_from_distance
from passreid.eval.feature_file import FeatureFile, read_feature_file
from passreid.eval.rank import DEFAULT_MEMORY_BUDGET_MB

JUNK_PID = -1


def load_split(path: Path) -> FeatureFile:
    """Read one split's feature file (``feats``, ``pids``, ``camids``); errors name the file and the key."""
    return read_feature_file(path, require=("pids", "camids"))


def drop_junk(split: FeatureFile, path: Path) -> tuple[FeatureFile, int]:
    """``split`` without its rows of pid -1 (junk / unknown identity, which the Market-1501 protocol leaves out
    rather than counting as negatives), and how many rows were dropped."""
    keep = split.pids != JUNK_PID
    dropped = int(np.count_nonzero(~keep))
    if dropped == 0:
        return split, 0
    if dropped == len(keep):
        raise EvaluationInputError(f"{path}: every row has pid {JUNK_PID} (junk / unknown identity); nothing to evaluate")
    paths = [p for p, kept in zip(split.paths, keep) if kept] if split.paths is not None else None
    return FeatureFile(split.feats[keep], split.pids[keep], split.camids[keep], paths=paths, model=split.model), dropped


def compute_metrics(query: FeatureFile, gallery: FeatureFile, args: argparse.Namespace, device: str):
    """Rank metrics of the feature distance, or of the re-ranked distance with ``--rerank``."""
    ids = (query.pids, gallery.pids, query.camids, gallery.camids)
    if not args.rerank:
        return rank_metrics(
            query.feats, gallery.feats, *ids, metric=args.metric, normalize=args.normalize,
            max_rank=args.max_rank, chunk_size=args.chunk_size, memory_budget_mb=args.memory_budget_mb,
            device=device,
        )
    from passreid.eval.rerank import re_ranking

    query_feats = torch.nn.functional.normalize(torch.from_numpy(query.feats), dim=1)
    gallery_feats = torch.nn.functional.normalize(torch.from_numpy(gallery.feats), dim=1)
    distance = re_ranking(query_feats, gallery_feats, k1=args.k1, k2=args.k2, lambda_value=args.lambda_value,
                          device=device)
    return rank_metrics_from_distance(
        distance, *ids, max_rank=args.max_rank, chunk_size=args.chunk_size,
        memory_budget_mb=args.memory_budget_mb, device=device,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="CMC / mAP / mINP of saved query and gallery features (Market-1501 protocol).",
    )
    parser.add_argument("--query", type=Path, required=True, help="query .npz with feats, pids, camids")
    parser.add_argument("--gallery", type=Path, required=True, help="gallery .npz with feats, pids, camids")
    parser.add_argument("--out", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--metric", choices=["euclidean", "cosine"], default="euclidean")
    parser.add_argument("--no-normalize", dest="normalize", action="store_false",
                        help="use raw features (euclidean only; default: L2-normalise)")
    parser.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking before ranking")
    parser.add_argument("--k1", type=int, default=20)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--lambda", dest="lambda_value", type=float, default=0.3)
    parser.add_argument("--max-rank", type=int, default=50)
    parser.add_argument("--chunk-size", type=int, default=None, help="queries per chunk (default: from the budget)")
    parser.add_argument("--memory-budget-mb", type=float, default=DEFAULT_MEMORY_BUDGET_MB)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    add_debug_flag(parser)
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    if args.max_rank < 1:
        raise EvaluationInputError(f"--max-rank must be >= 1, got {args.max_rank}")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise EvaluationInputError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if not args.normalize and args.metric == "cosine":
        raise EvaluationInputError("--no-normalize only applies to --metric euclidean (cosine always normalises)")
    if args.rerank and (args.metric == "cosine" or not args.normalize):
        raise EvaluationInputError(
            "--rerank uses re-ranking's own base distance (squared Euclidean of the L2-normalised features); "
            "drop --metric cosine / --no-normalize"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EvaluationInputError("--device cuda was requested but CUDA is not available")


@error_boundary
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    query, gallery = load_split(args.query), load_split(args.gallery)
    if query.feats.shape[1] != gallery.feats.shape[1]:
        raise EvaluationInputError(
            f"feature dimension differs: {args.query} has D={query.feats.shape[1]}, "
            f"{args.gallery} has D={gallery.feats.shape[1]}"
        )
    (query, query_junk), (gallery, gallery_junk) = drop_junk(query, args.query), drop_junk(gallery, args.gallery)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = compute_metrics(query, gallery, args, device)

    report = result.to_dict()
    report["params"] = {
        "query": str(args.query),
        "gallery": str(args.gallery),
        "metric": args.metric,
        "normalize": args.normalize,
        "max_rank": args.max_rank,
        "cmc_length": len(result.cmc),
        "chunk_size": result.chunk_size,
        "memory_budget_mb": args.memory_budget_mb,
        "device": device,
        "rerank": {"k1": args.k1, "k2": args.k2, "lambda": args.lambda_value} if args.rerank else None,
        "tie_rule": "stable: ascending distance, then gallery index",
        "junk_dropped": {"query": query_junk, "gallery": gallery_junk},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")

    distance = "k-reciprocal re-ranking" if args.rerank else (
        f"{args.metric} ({'L2-normalised' if args.normalize or args.metric == 'cosine' else 'raw'} features)"
    )
    if query_junk or gallery_junk:
        print(f"dropped {gallery_junk} gallery and {query_junk} query rows with pid {JUNK_PID} (junk, left out by "
              "the Market-1501 protocol)")
    print(f"query {result.num_queries} x gallery {result.num_gallery}, {result.num_valid_queries} valid queries, "
          f"distance: {distance}")
    print(result.format_table())
    print(f"metrics written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
