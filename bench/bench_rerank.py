"""Benchmark: sparse k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3) on synthetic features.

    python bench/bench_rerank.py --scale market|msmt17 [--device cpu]

Synthetic L2-normalised 768-d query and gallery features with identity structure (see
``bench_cluster.synthetic_identity_features``) at the size of the real test sets: Market-1501
3,368 queries + 15,913 gallery images, MSMT17 11,659 + 82,161. The timed call,
``re_ranking(query, gallery)``, runs in a fresh subprocess that loads the features from a file and
reports its wall time and peak RSS (``ru_maxrss``, the whole process: Python, the torch import
(~0.7 GB for the CUDA build), the features and the dense (Q, G) result included). Writes
``bench/results/rerank_<scale>.json`` and prints a line with the exact command.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from bench_cluster import peak_rss_gb, run_worker, synthetic_identity_features, write_report

#: (queries, gallery images, identities) of each scale.
SCALES = {"market": (3368, 15913, 1501), "msmt17": (11659, 82161, 3060)}
TARGETS = {"market": {"seconds": 15.0, "peak_rss_gb": 2.0}, "msmt17": {"seconds": None, "peak_rss_gb": 16.0}}


def worker(args: argparse.Namespace) -> dict:
    """Runs in the fresh subprocess: load the features, time the re-ranking, report."""
    import torch

    from passreid.eval.rerank import re_ranking

    num_query = SCALES[args.scale][0]
    feats = torch.from_numpy(np.load(args.features_file))
    query, gallery = feats[:num_query], feats[num_query:]
    if args.threads:
        torch.set_num_threads(args.threads)
    rss_before = peak_rss_gb()
    cpu_start = time.process_time()
    start = time.perf_counter()
    dist = re_ranking(query, gallery, k1=20, k2=6, lambda_value=0.3, device=args.device)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    # Checked in row chunks: isfinite() on the whole (Q, G) result would allocate several of its size.
    finite = all(bool(torch.isfinite(dist[s:s + 1024]).all()) for s in range(0, len(dist), 1024))
    if dist.shape != (len(query), len(gallery)) or not finite:
        raise RuntimeError(f"re-ranking returned shape {tuple(dist.shape)} or NaN/Inf values")
    # CPU seconds (all threads) help judge a timing taken while other processes share the cores.
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
            "torch_threads": torch.get_num_threads(), "peak_rss_gb": round(peak_rss_gb(), 3),
            "peak_rss_before_call_gb": round(rss_before, 3), "num_query": len(query), "num_gallery": len(gallery),
            "result_gb": round(dist.numel() * 4 / 2**30, 3)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), required=True)
    parser.add_argument("--device", default="cpu", help="device of the dense steps (default cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--features-file", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    num_query, num_gallery, num_ids = SCALES[args.scale]
    report = run_worker(__file__, argv, synthetic_identity_features(num_query + num_gallery, num_ids, seed=1))
    report.update(device=args.device)
    write_report(f"rerank_{args.scale}", argv, __file__, report, TARGETS[args.scale])
    return 0


if __name__ == "__main__":
    sys.exit(main())
