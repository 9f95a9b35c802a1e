"""Benchmark: fine-tuning training images/s and evaluation feature-extraction images/s.

    python bench/bench_finetune.py [--arch vit_small] [--img-size 256 128] [--device cpu|cuda]
                                   [--precision fp32|bf16] [--batch 64] [--eval-batch 128]

The model and loss are the PASS fine-tuning recipe's (``FinetuneConfig`` defaults: PASS head with four
BN necks, 751 identities as Market-1501, CE + soft-margin triplet, SGD with momentum); inputs are random
tensors of the recipe's shape with P x K = 16 x 4 identity structure, so data loading is not timed.

* training: median wall time of ``--steps`` full iterations (forward, loss, backward, SGD step) after
  one warm-up iteration -> images/s;
* extraction: median wall time of ``--steps`` eval-mode forwards of ``--eval-batch`` images under
  ``torch.no_grad`` (what ``finetune/test.py`` and the USL feature pass run) -> images/s.

CPU process time is recorded next to the wall time (the machine may be shared). On a GPU,
``--precision bf16`` runs under autocast as the recipes do. Writes
``bench/results/finetune_<arch>_<H>x<W>_<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from passreid.engine import autocast_for
from passreid.engine.optim import make_optimizer
from passreid.finetune import FinetuneConfig
from passreid.finetune.meta_arch import ReIDBatch, ReIDMetaArch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NUM_CLASSES, NUM_CAMERAS = 751, 6  # Market-1501's training set


def timed(function, steps: int, sync) -> tuple[float, float]:
    """Median wall and process-CPU seconds of ``steps`` calls (after one warm-up call)."""
    function()
    sync()
    walls, cpus = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        function()
        sync()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    return statistics.median(walls), statistics.median(cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small", choices=("vit_tiny", "vit_small", "vit_base"))
    parser.add_argument("--img-size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--batch", type=int, default=64, help="training batch (16 identities x 4)")
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    cfg = FinetuneConfig()
    cfg.model.arch, cfg.model.img_size, cfg.train.precision = args.arch, list(args.img_size), args.precision
    meta = ReIDMetaArch.from_config(cfg, NUM_CLASSES, NUM_CAMERAS, load_weights=False, device=device)
    model = meta.model
    optimizer = make_optimizer(meta.param_groups(cfg.optim), cfg.optim)
    amp = autocast_for(device, args.precision)
    images = torch.randn(args.batch, 3, *args.img_size, device=device)
    pids = torch.arange(args.batch // 4, device=device).repeat_interleave(4)
    camids = torch.zeros(args.batch, dtype=torch.long, device=device)
    batch = ReIDBatch(images, pids, camids, extras={})
    eval_images = torch.randn(args.eval_batch, 3, *args.img_size, device=device)

    def train_step() -> None:  # the trainer's step: forward_backward, then the (scaled) optimizer step
        model.train()
        optimizer.zero_grad(set_to_none=True)
        meta.forward_backward(batch, autocast=amp.autocast, scaler=amp.scaler)
        if amp.scaler is not None:
            amp.scaler.step(optimizer)
            amp.scaler.update()
        else:
            optimizer.step()

    @torch.no_grad()
    def extract() -> None:
        model.eval()
        with amp.autocast():
            model(eval_images)

    train_wall, train_cpu = timed(train_step, args.steps, sync)
    eval_wall, eval_cpu = timed(extract, args.steps, sync)
    h, w = args.img_size
    result = {
        "name": f"finetune_{args.arch}_{h}x{w}_{device.type}",
        "train_images_per_s": round(args.batch / train_wall, 2),
        "train_seconds_per_step": round(train_wall, 3),
        "train_cpu_seconds_per_step": round(train_cpu, 3),
        "extract_images_per_s": round(args.eval_batch / eval_wall, 2),
        "extract_seconds_per_batch": round(eval_wall, 3),
        "extract_cpu_seconds_per_batch": round(eval_cpu, 3),
        "arch": args.arch,
        "img_size": [h, w],
        "batch": args.batch,
        "eval_batch": args.eval_batch,
        "precision": args.precision,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1024**3, 2) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "machine": platform.machine(),
        "command": " ".join(["python", "bench/bench_finetune.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = args.out or RESULTS_DIR / f"{result['name']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
