"""Benchmark: memory of the pre-training image list at LUPerson scale, in the training process and in each
DataLoader worker, for a Python list of ``ImageItem`` against ``passreid.data.path_table.PathTable``.

    python bench/bench_worker_memory.py [--images 4180000] [--workers 4] [--processes 8]

A worker is a fork of the training process: reading a Python object writes its reference count, which copies
the page that holds it into the worker. Each worker reads its share of one epoch in random order
(``images / (workers x processes)`` paths: what each of 10 workers of each of 8 GPUs reads on LUPerson) and
reports its private dirty memory (``/proc/self/smaps_rollup``) above what it had when it started. The paths
are LUPerson LMDB addresses (``lmdb://<db>#<key>``) of a realistic length. Linux only. Writes
``bench/results/worker_memory.json`` and prints one line per store.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from passreid.data import ImageItem
from passreid.data.path_table import PathTable

RESULTS_DIR = Path(__file__).resolve().parent / "results"
READ_BATCH = 1000  # reads per DataLoader sample (one memory report each)


def private_dirty_mb() -> float:
    with open("/proc/self/smaps_rollup") as handle:
        for line in handle:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no Private_Dirty in /proc/self/smaps_rollup")


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def luperson_addresses(count: int):
    """LMDB addresses shaped like the LUPerson release's keys (video folder / frame / person)."""
    return (f"lmdb:///data/LUPerson/lmdb#{index // 1000:05d}%2F{index:08d}_{index % 97:02d}.jpg"
            for index in range(count))


class _Reads(Dataset):
    """Sample ``[i, j, ...]`` reads those paths of the store; returns the worker's memory growth since its start
    (measured once per batch: reading smaps_rollup walks the whole process)."""

    def __init__(self, store, read) -> None:
        self.store, self.read = store, read

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, indices: list[int]) -> tuple[int, float]:
        for index in indices:
            self.read(self.store, index)
        worker = get_worker_info()
        return worker.id, private_dirty_mb() - _start_private[worker.id]


_start_private: dict[int, float] = {}


def _record_start(worker_id: int) -> None:
    _start_private[worker_id] = private_dirty_mb()


def worker_growth(store, read, reads_per_worker: int, workers: int) -> list[float]:
    """Private memory each worker gained while reading ``reads_per_worker`` random paths of ``store``."""
    order = np.random.default_rng(0).permutation(len(store))[: reads_per_worker * workers].tolist()
    batches = [order[start:start + READ_BATCH] for start in range(0, len(order), READ_BATCH)]
    loader = DataLoader(_Reads(store, read), batch_size=None, sampler=batches, num_workers=workers,
                        worker_init_fn=_record_start)
    growth = [0.0] * workers
    for worker, gained in loader:
        growth[worker] = max(growth[worker], gained)
    return growth


def measure(kind: str, images: int, workers: int, reads_per_worker: int) -> dict:
    """The store's memory in this process (resident growth: what the dataset readers' list holds, strings
    included; the table after its build's temporary list is freed) and each worker's growth."""
    before = resident_mb()
    paths = luperson_addresses(images)
    if kind == "list":
        store = [ImageItem(path, -1, -1) for path in paths]
        read = lambda items, index: items[index].path  # noqa: E731  (what a Dataset holding the list does)
    else:
        store = PathTable(paths)
        read = lambda table, index: table[index]  # noqa: E731
    gc.collect()
    held = resident_mb() - before
    start = time.perf_counter()
    growth = worker_growth(store, read, reads_per_worker, workers)
    row = {"store": kind, "held_mb": round(held, 1), "worker_growth_mb": [round(g, 1) for g in growth],
           "seconds": round(time.perf_counter() - start, 1)}
    if kind == "table":
        row["table_arrays_mb"] = round(store.nbytes / 2**20, 1)
    del store
    gc.collect()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4_180_000, help="paths in the list (LUPerson: 4.18 M)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers measured")
    parser.add_argument("--processes", type=int, default=8, help="training processes sharing an epoch (GPUs)")
    parser.add_argument("--workers-per-process", type=int, default=10,
                        help="workers per training process sharing an epoch (the launch profile's 10 CPUs)")
    args = parser.parse_args()
    if not Path("/proc/self/smaps_rollup").is_file():
        print("bench_worker_memory.py needs Linux (/proc/self/smaps_rollup)", file=sys.stderr)
        return 2
    reads = args.images // (args.processes * args.workers_per_process)
    rows = [measure(kind, args.images, args.workers, reads) for kind in ("list", "table")]
    for row in rows:
        print(f"{row['store']:5s}: {row['held_mb']:7.1f} MB in the training process; each worker gained "
              f"{max(row['worker_growth_mb']):6.1f} MB after {reads} random reads ({row['seconds']} s)")
    record = {"command": "python " + " ".join(sys.argv), "machine": platform.platform(),
              "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "torch": torch.__version__, "images": args.images,
              "reads_per_worker": reads, "path_example": next(luperson_addresses(1)), "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "worker_memory.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
