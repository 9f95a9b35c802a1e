"""Benchmark: one full PASS pre-training step on the CPU (ViT-S/16, 8 images, 2 + 9 crops, 4 x 65536 heads).

    python bench/bench_pretrain_step.py [--batch 8] [--steps 3] [--optimizer foreach|fused]

A step is what the training loop does per iteration: ``zero_grad``, ``PASSMetaArch.forward_backward``
(teacher on the 2 globals, student on all 11 views, 44-term loss, centre update, backward),
per-tensor gradient clipping at 3.0, ``AdamW.step`` (two parameter groups, weight decay on the
first) and the teacher EMA. Inputs are random tensors of the published shapes (2 x 256x128 and
9 x 128x64 per image), so data loading is not timed. One untimed warm-up step comes first
(allocator and oneDNN set-up); the figure is the median wall time of ``--steps`` timed steps, with
the process CPU time (all threads) next to it: on a shared machine the wall time grows with the
load, the CPU time much less. Epoch 1 is used, so the last layers are updated (epoch 0 freezes
them and would be cheaper).

Peak RSS is ``ru_maxrss`` of this process (run it as a fresh process): Python, the torch import,
student + teacher (2 x 111.0 M parameters), gradients, AdamW moments and the activations.
No ratio to the published implementation is printed: a speed-up is only meaningful when one run times
both on the same inputs and load (interleaved), which this script does not do.
Writes ``bench/results/pretrain_step.json`` and prints the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from passreid.pretrain import PASSMetaArch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def peak_rss_gb() -> float:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def make_views(batch: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 256, 128, generator=gen) for _ in range(2)] + [
        torch.randn(batch, 3, 128, 64, generator=gen) for _ in range(9)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--optimizer", choices=("foreach", "fused"), default="foreach",
                        help="AdamW implementation (the trainer uses foreach on CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "pretrain_step.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    rss_start = peak_rss_gb()
    meta = PASSMetaArch(args.arch, out_dim=args.out_dim)
    groups = meta.param_groups()
    for group in groups:
        group["weight_decay"] = 0.04 * group["wd_multiplier"]
    optimizer = torch.optim.AdamW(groups, lr=1e-4, **{args.optimizer: True})
    views = make_views(args.batch)
    rss_built = peak_rss_gb()

    def step() -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        meta.forward_backward(views, epoch=1)
        meta.clip_gradients(3.0)
        optimizer.step()
        meta.update_teacher(0.996)
        return time.perf_counter() - start, time.process_time() - cpu_start

    warmup, _ = step()
    timed = [step() for _ in range(args.steps)]
    times = [wall for wall, _ in timed]
    cpu_times = [cpu for _, cpu in timed]
    result = {
        "name": "pretrain_step",
        "seconds_per_step": round(statistics.median(times), 3),
        "step_times": [round(t, 3) for t in times],
        "cpu_seconds_per_step": round(statistics.median(cpu_times), 3),
        "warmup_step_seconds": round(warmup, 3),
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "peak_rss_after_build_gb": round(rss_built, 3),
        "peak_rss_at_start_gb": round(rss_start, 3),
        "arch": args.arch,
        "batch": args.batch,
        "views": "2 x 256x128 + 9 x 128x64",
        "out_dim": args.out_dim,
        "parameters_per_network": sum(p.numel() for p in meta.student.parameters()),
        "optimizer": f"AdamW({args.optimizer})",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "machine": platform.machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
