"""Benchmark: decoded PASS multi-crop samples per second per CPU core (the pre-training input pipeline).

    python bench/bench_multicrop_loading.py [--images 256] [--size 128x256] [--workers 2]

What one pre-training sample costs the data loader: read a JPEG from disk, decode it, and build the
published multi-crop views (2 x 256x128 globals, 9 x 128x64 band locals, colour jitter, grayscale,
blur, solarisation, ImageNet normalisation: ``MultiCropAugmentation(mode="pass")``), exactly as
``passreid.pretrain.data.MultiCropDataset`` does, seeded per sample.

The images are the generated world's unlabeled pool upscaled to ``--size`` (W x H; LUPerson crops are
person boxes of roughly this size) and written as JPEG (quality 95) to a temporary folder, so decoding
is measured on realistic files. Three figures, all from process CPU time with one torch thread, so
they are per core and hardly affected by other load on the machine:

* ``decode_ms``: open + decode + RGB conversion per image (what a faster decoder would save);
* ``augment_ms``: the multi-crop transform on a decoded image;
* ``samples_per_core_s``: 1000 / (decode + augment), the rate one loader worker sustains.

``top_ops`` is a cProfile breakdown of the augmentation (share of its time per function), the
profile to read before optimising anything. Then a ``DataLoader`` with ``--workers`` worker processes and the trainer's collate function measures
the wall-clock rate when the workers run in parallel (on this 2-core machine, at most 2x).
A GPU consuming R images/s needs about R / samples_per_core_s loader cores.
Writes ``bench/results/multicrop_loading.json``.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from passreid.data import ImageItem, build_dataset, read_image
from passreid.data.multicrop import MultiCropAugmentation
from passreid.demo.world import generate_world
from passreid.pretrain.data import MultiCropDataset, collate_views

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_images(folder: Path, count: int, size: tuple[int, int]) -> list[ImageItem]:
    """``count`` JPEGs of ``size`` (W, H) made from the generated pool (rendered into ``folder``)."""
    world = generate_world(folder / "world", seed=0)
    pool = build_dataset("image_folder", str(world / "pool")).train
    items = []
    for index in range(count):
        source = pool[index % len(pool)].path
        path = folder / "images" / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(source).convert("RGB").resize(size, Image.BICUBIC).save(path, quality=95)
        items.append(ImageItem(str(path), -1, -1))
    return items


def cpu_ms_per_item(function, items: list[ImageItem]) -> float:
    start = time.process_time()
    for item in items:
        function(item)
    return 1000.0 * (time.process_time() - start) / len(items)


def profile_shares(function, items: list[ImageItem], top: int = 6) -> dict[str, float]:
    """Fraction of ``function``'s time spent inside each of its ``top`` most expensive callees."""
    profiler = cProfile.Profile()
    profiler.enable()
    for item in items:
        function(item)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    total = sum(tottime for _, _, tottime, _, _ in stats.values())
    ranked = sorted(stats.items(), key=lambda entry: entry[1][2], reverse=True)[:top]
    return {f"{Path(file).name}:{name}": round(values[2] / total, 3) for (file, _, name), values in ranked}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", default="128x256", help="W x H of the test JPEGs")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the parallel figure")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "multicrop_loading.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    width, height = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        items = write_images(Path(tmp), args.images, (width, height))
        augmentation = MultiCropAugmentation(mode="pass")  # the published sizes and probabilities
        decoded = {item.path: read_image(item.path) for item in items[:8]}  # warm-up (imports, caches)
        decode_ms = cpu_ms_per_item(lambda item: read_image(item.path), items)
        decoded = {item.path: read_image(item.path) for item in items}
        augmentation(decoded[items[0].path])
        augment_ms = cpu_ms_per_item(lambda item: augmentation(decoded[item.path]), items)
        top_ops = profile_shares(lambda item: augmentation(decoded[item.path]), items[:64])

        dataset = MultiCropDataset(items, augmentation, seed=0)
        loader = DataLoader(dataset, batch_size=args.batch, num_workers=args.workers, collate_fn=collate_views,
                            shuffle=False, persistent_workers=False)
        start = time.perf_counter()
        seen = sum(len(batch["index"]) for batch in loader)
        loader_seconds = time.perf_counter() - start

    per_core = 1000.0 / (decode_ms + augment_ms)
    result = {
        "name": "multicrop_loading",
        "image_size_wh": [width, height],
        "views": "2 x 256x128 + 9 x 128x64 (PASS bands)",
        "images": args.images,
        "decode_ms": round(decode_ms, 3),
        "augment_ms": round(augment_ms, 3),
        "samples_per_core_s": round(per_core, 1),
        "top_ops": top_ops,
        "loader_workers": args.workers,
        "loader_samples_s": round(seen / loader_seconds, 1),
        "loader_note": "wall clock incl. worker start-up; includes the other load on the machine",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "machine": platform.machine(),
        "command": "python bench/bench_multicrop_loading.py " + " ".join(
            f"--{key.replace('_', '-')} {value}" for key, value in
            (("images", args.images), ("size", args.size), ("workers", args.workers))),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
