"""Plot the curves of a run's metrics.jsonl (loss, learning rate, mAP / Rank-1, kNN scores) to a PNG.

    python tools/plot_training.py runs/market/metrics.jsonl --out curves.png
    python tools/plot_training.py runs/market --out curves.png --keys loss lr mAP

``metrics.jsonl`` holds one JSON record per line, ``{"step", "split", "time", <scalars>}`` (what every
passreid training stage writes); a run folder means its ``metrics.jsonl``. When a step was written twice
(a resumed run repeats the steps after its last checkpoint) the last record wins, as documented by the
writer. One panel per plotted scalar, one line per split; by default the panels are the losses, the
learning rate and the retrieval metrics (mAP, Rank-1, mINP and their kNN / re-ranked variants) found in
the file. Needs matplotlib. Exit status 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from passreid.cli import error_boundary
from passreid.config import add_debug_flag

DEFAULT_KEYS = ("loss", "lr", "mAP", "rank1", "mINP")
SKIPPED = ("step", "split", "time")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", type=Path, help="metrics.jsonl, or the run folder holding it")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--keys", nargs="*", default=None,
                        help="scalars to plot (default: losses, lr and retrieval metrics present in the file)")
    add_debug_flag(parser)
    return parser


def read_metrics(path: Path) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """``{(split, key): [(step, value), ...]}`` sorted by step, the last record of a repeated step kept."""
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path} (expected a run's metrics.jsonl)")
    latest: dict[tuple[str, int], dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON record ({error})") from error
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or "split" not in record:
            raise ValueError(f"{path}:{number}: expected a record with an integer 'step' and a 'split', "
                             f"got {line[:80]!r}")
        latest[(str(record["split"]), step)] = record
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for (split, step), record in sorted(latest.items(), key=lambda item: item[0][1]):
        for key, value in record.items():
            if key in SKIPPED or isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
                continue
            series.setdefault((split, key), []).append((step, math.nan if value is None else float(value)))
    if not series:
        raise ValueError(f"{path}: no scalar metrics found")
    return series


def default_keys(series: dict[tuple[str, str], list]) -> list[str]:
    present = sorted({key for _, key in series})
    keys = [k for k in present if k == "loss" or k.endswith("_loss") or k.startswith("loss")]
    keys += [k for k in present if k == "lr"]
    keys += [k for k in present if any(k == m or k.endswith("_" + m) for m in ("mAP", "rank1", "mINP"))]
    return keys or present[:6]


def plot(series: dict[tuple[str, str], list[tuple[int, float]]], keys: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    missing = [k for k in keys if not any(key == k for _, key in series)]
    if missing:
        available = sorted({key for _, key in series})
        raise ValueError(f"no metric named {missing} in the file; available: {available}")
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for axis, key in zip(axes.flat, keys):
        for (split, name), points in sorted(series.items()):
            if name == key:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=split)
        axis.set_title(key)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        if key == "lr":
            axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for axis in list(axes.flat)[len(keys):]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


@error_boundary(extra=(ValueError, ImportError))  # ImportError: matplotlib missing
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.out.parent.is_dir():
        raise FileNotFoundError(f"output folder {args.out.parent} does not exist")
    series = read_metrics(args.metrics)
    keys = args.keys or default_keys(series)
    plot(series, keys, args.out)
    print(f"wrote {args.out}: {', '.join(keys)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
