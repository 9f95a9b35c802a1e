"""Benchmark the chunked rank metrics (CMC/mAP/mINP) at real benchmark sizes on synthetic features.

    python bench/bench_rank_metrics.py --scale market            # 3368 x 15913, 750 ids, 6 cameras
    python bench/bench_rank_metrics.py --scale msmt17 --device cpu  # 11659 x 82161, 3060 ids, 15 cameras

Features (D=768, float32) are L2-normalised identity centres plus Gaussian noise, generated in row
chunks so no large temporary exists; Market's gallery also holds pid-0 distractors (pure noise).

Measurement: the work runs in a fresh worker subprocess so that its peak memory is its own. Peak RSS
is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of that worker (tracemalloc does not see torch's
allocations). Generation only allocates the feature matrices plus one small chunk, so the RSS after
generation is the baseline; ``peak_rss_delta_mb`` = peak RSS - that baseline is what the metric
computation added on top of the features (``rss_baseline_mb`` is the worker after ``import torch``:
about 0.7 GB for the CUDA build of torch, even on a CPU-only host). Only ``rank_metrics(...)`` is
timed (not generation); ``metric_cpu_seconds`` (all threads) helps judge timings on a busy host.
Prints one result line and writes ``bench/results/rank_metrics_<scale>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

SCALES = {
    # num_query, num_gallery, identities, cameras, gallery distractors (pid 0)
    "market": dict(num_query=3368, num_gallery=15913, num_ids=750, num_cams=6, num_distractors=2793,
                   max_seconds=3.0, max_rss_mb=1024),
    "msmt17": dict(num_query=11659, num_gallery=82161, num_ids=3060, num_cams=15, num_distractors=0,
                   max_seconds=60.0, max_rss_mb=3072),
}
DIM = 768
# Noise norm relative to the unit identity centre, varied per image: mid-range mAP, not a trivial one.
NOISE = 2.2
NOISE_SPREAD = 0.2
GEN_CHUNK = 8192


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _synthetic_split(torch, num: int, num_ids: int, num_cams: int, num_distractors: int,
                     centres, generator):
    """Features, pids and camids for one split; every identity gets about the same number of rows."""
    num_labelled = num - num_distractors
    pids = torch.arange(num_labelled) % num_ids + 1
    pids = torch.cat([pids[torch.randperm(num_labelled, generator=generator)],
                      torch.zeros(num_distractors, dtype=torch.long)])
    camids = torch.randint(0, num_cams, (num,), generator=generator)
    feats = torch.empty(num, DIM)
    for start in range(0, num, GEN_CHUNK):
        end = min(start + GEN_CHUNK, num)
        # Per-image noise level (log-normal around NOISE): a spread of easy and hard images.
        noise = NOISE * torch.exp(NOISE_SPREAD * torch.randn(end - start, 1, generator=generator))
        block = torch.randn(end - start, DIM, generator=generator).mul_(noise / DIM**0.5)
        chunk_pids = pids[start:end]
        labelled = chunk_pids > 0
        block[labelled] += centres[chunk_pids[labelled] - 1]
        feats[start:end] = torch.nn.functional.normalize(block, dim=1)
    return feats, pids, camids


def run_worker(args: argparse.Namespace) -> dict:
    """Generate the features, time rank_metrics and measure memory (runs in the worker process)."""
    import torch

    from passreid.eval import rank_metrics

    scale = SCALES[args.scale]
    baseline_rss = _rss_mb()
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    centres = torch.nn.functional.normalize(torch.randn(scale["num_ids"], DIM, generator=generator), dim=1)
    query = _synthetic_split(torch, scale["num_query"], scale["num_ids"], scale["num_cams"], 0, centres, generator)
    gallery = _synthetic_split(torch, scale["num_gallery"], scale["num_ids"], scale["num_cams"],
                               scale["num_distractors"], centres, generator)
    generation_seconds = time.perf_counter() - start
    rss_after_generation = _rss_mb()
    peak_after_generation = _peak_rss_mb()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start, cpu_start = time.perf_counter(), time.process_time()
    result = rank_metrics(query[0], gallery[0], query[1], gallery[1], query[2], gallery[2],
                          chunk_size=args.chunk_size, memory_budget_mb=args.memory_budget_mb, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    metric_seconds = time.perf_counter() - start
    metric_cpu_seconds = time.process_time() - cpu_start
    peak_rss = _peak_rss_mb()
    return {
        "scale": args.scale,
        "num_query": scale["num_query"],
        "num_gallery": scale["num_gallery"],
        "dim": DIM,
        "num_ids": scale["num_ids"],
        "num_cams": scale["num_cams"],
        "num_distractors": scale["num_distractors"],
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),  # taken after the timed call
        "chunk_size": result.chunk_size,
        "memory_budget_mb": args.memory_budget_mb,
        "generation_seconds": round(generation_seconds, 3),
        "metric_seconds": round(metric_seconds, 3),
        "metric_cpu_seconds": round(metric_cpu_seconds, 3),  # all threads; shows contention on busy hosts
        "rss_baseline_mb": round(baseline_rss, 1),
        "rss_after_generation_mb": round(rss_after_generation, 1),
        "peak_rss_mb": round(peak_rss, 1),
        "peak_rss_delta_mb": round(peak_rss - max(rss_after_generation, peak_after_generation), 1),
        "mAP": result.mAP,
        "mINP": result.mINP,
        "rank1": result.rank(1),
        "num_valid_queries": result.num_valid_queries,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--chunk-size", type=int, default=None, help="queries per chunk (default: from the budget)")
    parser.add_argument("--memory-budget-mb", type=float, default=256.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: bench/results/rank_metrics_<scale>.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0

    command = "python bench/bench_rank_metrics.py " + " ".join(shlex.quote(a) for a in argv)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--worker"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return proc.returncode
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    scale = SCALES[args.scale]
    record["targets"] = {"max_seconds": scale["max_seconds"], "max_peak_rss_mb": scale["max_rss_mb"]}
    record["meets_targets"] = (record["metric_seconds"] <= scale["max_seconds"]
                               and record["peak_rss_mb"] <= scale["max_rss_mb"])
    record["command"] = command
    out = args.out or REPO_ROOT / "bench" / "results" / f"rank_metrics_{args.scale}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"rank_metrics {args.scale}: {record['num_query']}x{record['num_gallery']} D={DIM} "
        f"{record['device']} ({record['torch_threads']} threads) chunk={record['chunk_size']}: "
        f"{record['metric_seconds']:.2f} s (CPU {record['metric_cpu_seconds']:.2f} s), "
        f"peak RSS {record['peak_rss_mb']:.0f} MB "
        f"(+{record['peak_rss_delta_mb']:.0f} MB over features), mAP {100 * record['mAP']:.1f}% "
        f"R1 {100 * record['rank1']:.1f}% [target <= {scale['max_seconds']:.0f} s, <= {scale['max_rss_mb']} MB: "
        f"{'OK' if record['meets_targets'] else 'MISSED'}] | {command} -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
