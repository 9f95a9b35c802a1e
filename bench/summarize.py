#!/usr/bin/env python
"""Print the bench/results/*.json figures as the markdown table quoted in README.md and bench/README.md."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

ROWS = [
    ("rank metrics, Market scale (3368 x 15913)", "rank_metrics_market", "<= 3 s, <= 1 GB"),
    ("rank metrics, MSMT17 scale (11659 x 82161)", "rank_metrics_msmt17", "<= 60 s, <= 3 GB"),
    ("re-ranking, Market scale (19281 images)", "rerank_market", "<= 15 s, <= 2 GB"),
    ("re-ranking, MSMT17 scale (93820 images)", "rerank_msmt17", "completes in <= 16 GB"),
    ("Jaccard + DBSCAN, Market train (12936)", "cluster_market", "<= 4 s, <= 1 GB"),
    ("Jaccard + DBSCAN, MSMT17 train (32621)", "cluster_msmt17", "<= 12 s, <= 2 GB"),
    ("Jaccard + DBSCAN, 200k images", "cluster_200k", "completes in <= 8 GB"),
]


def seconds_and_peak_gb(result: dict) -> tuple[float, float]:
    """The timed section's wall time and the process's peak RSS, whichever script wrote the file."""
    if "metric_seconds" in result:
        return result["metric_seconds"], result["peak_rss_mb"] / 1024
    return result["seconds"], result["peak_rss_gb"]


def main() -> None:
    print("| task | this code (2-core CPU) | peak RSS | target | load avg during run | command |")
    print("|---|---|---|---|---|---|")
    for title, name, target in ROWS:
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            print(f"| {title} | not run | | {target} | | |")
            continue
        result = json.loads(path.read_text())
        seconds, peak_gb = seconds_and_peak_gb(result)
        command = result.get("command", "").removeprefix(".venv/bin/")
        load = result.get("load_average_1min")
        if isinstance(load, dict):  # some scripts record it before and after the timed call
            load = load.get("before")
        load_text = f"{load:.1f}" if load is not None else "n/a"
        print(f"| {title} | {seconds:.1f} s | {peak_gb:.2f} GB | {target} | {load_text} | `{command}` |")


if __name__ == "__main__":
    main()
