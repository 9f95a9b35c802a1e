"""Benchmark: what one PASS multi-crop sample costs the loader workers, published pipeline against the
device-side path (``data.augment_on: cpu | gpu``), on real Market-1501 JPEGs.

    python bench/bench_multicrop_loading.py [--images 256] [--sizes native,128x256] [--workers 2]
                                            [--device cpu|cuda] [--market DIR]

The images are the first ``--images`` JPEGs of Market-1501's ``bounding_box_train`` (``--market``, else
``PASSREID_MARKET1501``, else ``../shared/data/Market-1501-v15.09.15``), at their own size (``native``,
64x128) and upscaled (bicubic, JPEG quality 95, written to a temporary folder) to each ``WxH`` of
``--sizes`` (LUPerson's person crops are larger than Market's; 128x256 is a typical one).

Per size, with one torch thread and the process CPU time (so the figures are per core and hardly move
with other load on the machine), after one untimed pass over the files (page cache warm):

* ``published``: ``MultiCropDataset.__getitem__`` with ``MultiCropAugmentation(mode="pass")`` (read,
  decode, the 2 + 9 PIL views, to tensor, normalise; seeded per sample as in training), plus its share
  of ``collate_views`` (stacking the views of a ``--batch``): the worker's whole job with
  ``augment_on=cpu``. ``decode_ms`` (open + decode + RGB) is given apart.
* ``device_worker``: the same ``__getitem__`` with ``MultiCropParamSampler`` (read, decode, the image
  as a uint8 tensor, every random parameter of the 11 views drawn as the published transforms draw
  them) plus its share of ``collate_device_samples`` (padding the images into one uint8 batch):
  the worker's whole job with ``augment_on=gpu``; its ``top_ops`` is a cProfile breakdown (share of
  the worker's time per function) of what the worker still does.
* ``cpu_share_ratio``: published / device_worker CPU-ms per sample (issue 16 asks for >= 5).

Then the wall-clock samples/s of each path through a ``DataLoader`` with ``--workers`` worker
processes and the trainer's collate functions (``loader`` in the JSON): with ``--loader-epochs`` N > 1
the first pass is untimed (worker start-up) and passes 2..N are timed; for the device path the views
are made by ``BatchedMultiCrop`` on ``--device`` (on the CPU that runs in this process and is not what
a GPU run sees: use ``--device cuda`` for the GPU figure). Writes ``bench/results/multicrop_loading.json``.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from passreid.data import ImageItem, read_image
from passreid.data.device_multicrop import BatchedMultiCrop, MultiCropParamSampler, collate_device_samples
from passreid.data.multicrop import MultiCropAugmentation
from passreid.pretrain.data import MultiCropDataset, collate_views

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def market_train_jpegs(market: Path | None, count: int) -> list[Path]:
    """The first ``count`` JPEGs (sorted) of Market-1501's bounding_box_train."""
    root = market or Path(os.environ.get("PASSREID_MARKET1501", REPO.parent / "shared/data/Market-1501-v15.09.15"))
    folder = root / "bounding_box_train"
    files = sorted(folder.glob("*.jpg"))[:count] if folder.is_dir() else []
    if not files:
        raise SystemExit(f"no Market-1501 JPEGs in {folder}: pass --market DIR or set PASSREID_MARKET1501")
    return files


def sized_items(files: list[Path], size: str, folder: Path) -> list[ImageItem]:
    """Items at the files' own size (``native``) or upscaled to ``WxH`` JPEGs (quality 95) in ``folder``."""
    if size == "native":
        return [ImageItem(str(path), -1, -1) for path in files]
    width, height = (int(value) for value in size.lower().split("x"))
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for path in files:
        target = folder / path.name
        Image.open(path).convert("RGB").resize((width, height), Image.BICUBIC).save(target, quality=95)
        items.append(ImageItem(str(target), -1, -1))
    return items


def cpu_ms_per_sample(dataset: MultiCropDataset, collate, batch: int) -> dict[str, float]:
    """CPU-ms per sample of ``__getitem__`` and of the sample's share of ``collate``."""
    get_cpu = collate_cpu = 0.0
    for start in range(0, len(dataset), batch):
        begin = time.process_time()
        chunk = [dataset[index] for index in range(start, min(start + batch, len(dataset)))]
        get_cpu += time.process_time() - begin
        begin = time.process_time()
        collate(chunk)
        collate_cpu += time.process_time() - begin
    count = len(dataset)
    return {"getitem_ms": round(1000 * get_cpu / count, 3), "collate_ms": round(1000 * collate_cpu / count, 3),
            "total_ms": round(1000 * (get_cpu + collate_cpu) / count, 3)}


def profile_shares(function, count: int, top: int = 8) -> dict[str, float]:
    """Fraction of ``function``'s time spent inside each of its ``top`` most expensive callees (own time)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for index in range(count):
        function(index)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    total = sum(tottime for _, _, tottime, _, _ in stats.values())
    ranked = sorted(stats.items(), key=lambda entry: entry[1][2], reverse=True)[:top]
    return {f"{Path(file).name}:{name}": round(values[2] / total, 3) for (file, _, name), values in ranked}


def loader_rate(dataset: MultiCropDataset, collate, workers: int, batch: int, epochs: int, on_batch=None) -> float:
    """Wall-clock samples/s through a DataLoader with persistent workers: with ``epochs`` > 1 the first pass
    is untimed (worker start-up) and the others are timed; with 1 the single pass is timed, start-up included."""
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate, shuffle=False,
                        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
    seen, start = 0, time.perf_counter()
    for epoch in range(epochs):
        if epoch == 1:
            seen, start = 0, time.perf_counter()
        for item in loader:
            if on_batch is not None:
                on_batch(item)
            seen += len(item["index"])
    return seen / (time.perf_counter() - start)


def measure_size(items: list[ImageItem], augmentation: MultiCropAugmentation, args: argparse.Namespace,
                 device: torch.device) -> dict:
    """All figures of one image size."""
    published = MultiCropDataset(items, augmentation, seed=0)
    device_side = MultiCropDataset(items, MultiCropParamSampler(augmentation), seed=0)
    for item in items:  # page cache and decoder warm-up
        read_image(item.path)
    published[0], device_side[0]

    begin = time.process_time()
    for item in items:
        read_image(item.path)
    decode_ms = 1000 * (time.process_time() - begin) / len(items)
    cpu_path = cpu_ms_per_sample(published, collate_views, args.batch)
    gpu_path = cpu_ms_per_sample(device_side, collate_device_samples, args.batch)
    top_ops = profile_shares(lambda index: device_side[index], min(len(items), 128))
    width, height = Image.open(items[0].path).size

    batched = BatchedMultiCrop(augmentation)

    def make_views(batch: dict) -> None:
        images = batch["images"].to(device, non_blocking=True)
        params = {key: value.to(device, non_blocking=True) for key, value in batch["params"].items()}
        batched(images, params)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.set_num_threads(args.device_threads)
    loader = {"published_samples_s": round(loader_rate(published, collate_views, args.workers, args.batch,
                                                       args.loader_epochs), 1),
              "device_path_samples_s": round(loader_rate(device_side, collate_device_samples, args.workers,
                                                         args.batch, args.loader_epochs, make_views), 1)}
    torch.set_num_threads(1)
    return {
        "image_size_wh": [width, height],
        "images": len(items),
        "published": {**cpu_path, "decode_ms": round(decode_ms, 3),
                      "samples_per_core_s": round(1000 / cpu_path["total_ms"], 1)},
        "device_worker": {**gpu_path, "samples_per_core_s": round(1000 / gpu_path["total_ms"], 1),
                          "top_ops": top_ops},
        "cpu_share_ratio": round(cpu_path["total_ms"] / gpu_path["total_ms"], 2),
        "loader": {"workers": args.workers, "batch": args.batch, "epochs": args.loader_epochs,
                   "device_side_on": str(device), **loader},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--sizes", default="native,128x256", help="'native' and/or WxH, comma separated")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the wall-clock figures")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--loader-epochs", type=int, default=1, help="passes over the images for the loader figures")
    parser.add_argument("--device", default="cpu", help="where BatchedMultiCrop runs in the loader figure")
    parser.add_argument("--device-threads", type=int, default=1,
                        help="torch threads of this process while the loader runs (the device side on a CPU)")
    parser.add_argument("--market", type=Path, default=None, help="Market-1501 root (has bounding_box_train/)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "multicrop_loading.json")
    args = parser.parse_args()
    if args.images < args.batch or args.loader_epochs < 1:
        raise SystemExit(f"--images ({args.images}) must be at least --batch ({args.batch}) and --loader-epochs >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    torch.set_num_threads(1)
    files = market_train_jpegs(args.market, args.images)
    augmentation = MultiCropAugmentation(mode="pass")  # the published sizes and probabilities
    load_before = os.getloadavg()[0]
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            items = sized_items(files, size, Path(tmp) / size)
            sizes[size] = measure_size(items, augmentation, args, device)
            row = sizes[size]
            print(f"{size} {row['image_size_wh']}: published {row['published']['total_ms']:.2f} CPU-ms/sample, "
                  f"device-path worker {row['device_worker']['total_ms']:.2f} CPU-ms/sample "
                  f"({row['cpu_share_ratio']}x less); loader ({args.workers} workers): published "
                  f"{row['loader']['published_samples_s']} samples/s, device path "
                  f"{row['loader']['device_path_samples_s']} samples/s", flush=True)
    result = {
        "name": "multicrop_loading",
        "views": "2 x 256x128 + 9 x 128x64 (PASS bands)",
        "source": "Market-1501 bounding_box_train, first files by name",
        "sizes": sizes,
        "torch": torch.__version__,
        "pillow": Image.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
