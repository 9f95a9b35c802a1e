"""Cluster-Contrast pseudo labels for a saved feature matrix: k-reciprocal Jaccard distance + DBSCAN.

Example (from the repository root):
    python tools/cluster_features.py --features feats.npz --out labels.npy
    python tools/cluster_features.py --features feats.npz --eps 0.7 --k1 30 --k2 6 --min-samples 4 --out labels.npy

``--features`` is an ``.npz`` holding ``feats`` (N x D, float). Rows are L2-normalised first unless
``--no-normalize`` is given (then they must already be unit-norm). ``--out`` receives an int64
``.npy`` with one label per row, ``-1`` for outliers. Prints the number of clusters and outliers.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from passreid.atomic_files import atomic_write
from passreid.cli import error_boundary
from passreid.cluster import dbscan_pseudo_labels
from passreid.config import add_debug_flag
from passreid.eval.feature_file import read_feature_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults are the published Cluster-Contrast settings)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", required=True, type=Path, help=".npz feature file holding 'feats' (N x D)")
    parser.add_argument("--out", required=True, type=Path, help="output .npy of int64 labels (-1 = outlier)")
    parser.add_argument("--k1", type=int, default=30, help="k-reciprocal neighbourhood size (default 30)")
    parser.add_argument("--k2", type=int, default=6, help="local query expansion size (default 6)")
    parser.add_argument("--eps", type=float, default=0.6, help="DBSCAN radius on the Jaccard distance (default 0.6)")
    parser.add_argument("--min-samples", type=int, default=4, help="DBSCAN core-point threshold (default 4)")
    parser.add_argument("--no-normalize", action="store_true", help="use the rows as given (must be unit-norm)")
    parser.add_argument("--backend", choices=("auto", "torch", "faiss"), default="auto", help="kNN backend")
    parser.add_argument("--device", default=None, help="kNN device, e.g. cpu or cuda (default: cuda if available)")
    add_debug_flag(parser)
    return parser.parse_args(argv)


@error_boundary
def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status (2 for bad input or options)."""
    args = parse_args(argv)
    feats = read_feature_file(args.features).feats
    start = time.perf_counter()
    labels = dbscan_pseudo_labels(feats, eps=args.eps, min_samples=args.min_samples, k1=args.k1, k2=args.k2,
                                  normalize=not args.no_normalize, backend=args.backend, device=args.device)
    elapsed = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda handle: np.save(handle, labels), what="labels file")
    num_clusters = len(np.unique(labels[labels >= 0]))
    num_outliers = int((labels == -1).sum())
    print(f"{len(labels)} features -> {num_clusters} clusters, {num_outliers} outliers "
          f"(eps={args.eps}, min_samples={args.min_samples}, k1={args.k1}, k2={args.k2}; {elapsed:.1f} s)")
    print(f"labels written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
