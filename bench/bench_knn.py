"""Benchmark: exact self-kNN on the CPU, faiss-cpu (``IndexFlatL2`` / ``IndexFlatIP``) against the torch backend.

    python bench/bench_knn.py [--sizes 12936x768,32621x384] [--k 30] [--threads 1,2] [--repeats 1]

Decides what ``passreid.cluster.knn(backend="auto")`` uses on a machine without GPUs. For each size
(synthetic unit-norm features with identity structure, as in ``bench_cluster.py``), each metric
(squared Euclidean, used by re-ranking and clustering; inner product) and each thread count, both
backends run the same search in this process (torch and faiss threads set to the same count) and the
best wall time of ``--repeats`` runs is kept, with the process CPU time next to it. The two results
are then compared: neighbour lists must agree except where a row's k-th and (k+1)-th candidates tie
(the order of equal distances is unspecified), and distances to 1e-4 (float32 rounding of
``||a||² + ||b||² - 2 a.b``). Writes ``bench/results/knn.json`` and prints one line per row.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cluster import synthetic_identity_features  # noqa: E402  (same folder)

from passreid.cluster import knn  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
IDENTITIES_PER_IMAGE = 751 / 12936  # Market-1501 train's identity density


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"12936x768,32621x384"`` -> [(12936, 768), (32621, 384)]."""
    sizes = []
    for part in text.split(","):
        rows, dim = (int(value) for value in part.lower().split("x"))
        if rows < 2 or dim < 1:
            raise SystemExit(f"--sizes: {part!r} needs at least 2 rows and 1 dimension")
        sizes.append((rows, dim))
    return sizes


def timed(function, repeats: int):
    """(best wall seconds, CPU seconds of that run, result) of ``repeats`` calls."""
    best = None
    for _ in range(repeats):
        cpu_start, start = time.process_time(), time.perf_counter()
        result = function()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if best is None or wall < best[0]:
            best = (wall, cpu, result)
    return best


def disagreement(torch_result, faiss_result) -> dict:
    """How far the two backends' answers are apart: rows whose neighbour sets differ, how many of
    those are ties at the k-th place, and the largest distance difference."""
    (dist_t, idx_t), (dist_f, idx_f) = torch_result, faiss_result
    max_dist_diff = float((dist_t - dist_f).abs().max())
    differing = [row for row in range(idx_t.shape[0]) if set(idx_t[row].tolist()) != set(idx_f[row].tolist())]
    # A differing row is a tie when the k-th values of the two lists are equal to rounding: the lists
    # then differ only in which of several equidistant points fills the last places.
    tol = 1e-4
    ties = sum(1 for row in differing if abs(float(dist_t[row, -1]) - float(dist_f[row, -1])) <= tol)
    return {"rows_with_other_neighbours": len(differing), "of_which_ties_at_kth": ties,
            "max_abs_distance_difference": max_dist_diff}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="12936x768,32621x384", help="rows x dim, comma separated")
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--threads", default="1,2", help="thread counts to try, comma separated")
    parser.add_argument("--metrics", default="sqeuclidean,inner_product")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "knn.json")
    args = parser.parse_args()
    try:
        import faiss
    except ImportError:
        raise SystemExit("bench_knn.py needs faiss-cpu: pip install -e '.[faiss]'")

    rows = []
    load_before = os.getloadavg()[0]
    for num_rows, dim in parse_sizes(args.sizes):
        feats = torch.from_numpy(synthetic_identity_features(
            num_rows, max(2, round(num_rows * IDENTITIES_PER_IMAGE)), dim=dim, subspace=min(64, dim)))
        for metric in args.metrics.split(","):
            for threads in (int(value) for value in args.threads.split(",")):
                torch.set_num_threads(threads)
                faiss.omp_set_num_threads(threads)
                t_wall, t_cpu, t_res = timed(lambda: knn(feats, args.k, backend="torch", metric=metric, device="cpu"),
                                             args.repeats)
                f_wall, f_cpu, f_res = timed(lambda: knn(feats, args.k, backend="faiss", metric=metric, device="cpu"),
                                             args.repeats)
                row = {"rows": num_rows, "dim": dim, "k": args.k, "metric": metric, "threads": threads,
                       "torch_seconds": round(t_wall, 3), "torch_cpu_seconds": round(t_cpu, 3),
                       "faiss_seconds": round(f_wall, 3), "faiss_cpu_seconds": round(f_cpu, 3),
                       "faiss_speedup": round(t_wall / f_wall, 2), **disagreement(t_res, f_res)}
                rows.append(row)
                print(f"{num_rows} x {dim}, k={args.k}, {metric}, {threads} thread(s): torch {t_wall:.2f} s, "
                      f"faiss {f_wall:.2f} s ({row['faiss_speedup']}x); rows with other neighbours "
                      f"{row['rows_with_other_neighbours']} (ties {row['of_which_ties_at_kth']})", flush=True)
    result = {
        "name": "knn",
        "rows": rows,
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "machine": platform.machine(),
        "processor": platform.processor() or platform.uname().processor,
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
