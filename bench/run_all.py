#!/usr/bin/env python
"""Run every benchmark row of bench/README.md, one fresh process each, and print the result lines.

    python bench/run_all.py                 # everything (the MSMT17 re-ranking and 200k rows take minutes)
    python bench/run_all.py --only rank     # rows whose name contains "rank"

Each script writes its JSON to bench/results/; this runner only sequences them.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent

ROWS: list[tuple[str, list[str]]] = [
    ("rank_metrics_market", ["bench_rank_metrics.py", "--scale", "market"]),
    ("rank_metrics_msmt17", ["bench_rank_metrics.py", "--scale", "msmt17"]),
    ("rerank_market", ["bench_rerank.py", "--scale", "market"]),
    ("rerank_msmt17", ["bench_rerank.py", "--scale", "msmt17"]),
    ("cluster_market", ["bench_cluster.py", "--scale", "market"]),
    ("cluster_msmt17", ["bench_cluster.py", "--scale", "msmt17"]),
    ("cluster_200k", ["bench_cluster.py", "--scale", "200k"]),
    ("knn", ["bench_knn.py"]),
    ("pretrain_step", ["bench_pretrain_step.py"]),
    ("multicrop_loading", ["bench_multicrop_loading.py"]),
    ("worker_memory", ["bench_worker_memory.py"]),
    ("finetune_vit_small_256x128_cpu", ["bench_finetune.py"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run only rows whose name contains this text")
    args = parser.parse_args()
    failures = []
    for name, command in ROWS:
        if args.only not in name:
            continue
        print(f"== {name}: python bench/{' '.join(command)}", flush=True)
        if subprocess.call([sys.executable, str(BENCH_DIR / command[0]), *command[1:]]) != 0:
            failures.append(name)
    if failures:
        print("failed rows: " + ", ".join(failures), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
