#!/usr/bin/env python
"""Run the whole passreid pipeline on the built-in generated dataset (``make demo``).

Each stage runs through its own entry point, exactly as a user would run it, into
``<output-dir>/<stage>``; every stage starts from the previous stage's export:

1. ``pretrain``  PASS pre-training of a tiny ViT on the generated world's unlabeled ``pool/``
   (``configs/pretrain/demo.yaml``) -> ``pretrain/backbone_final.pth``;
2. ``finetune``  supervised fine-tuning on the generated ``market/`` split from that export
   (``configs/finetune/demo.yaml``) -> ``finetune/model_final.pth``;
3. ``finetune_random``  the same fine-tuning from random initialisation, for comparison;
4. ``test``  ``finetune/test.py`` on the fine-tuned model: metrics and query / gallery features;
5. ``usl``  Cluster-Contrast unsupervised training from the pre-training export (``configs/usl/demo.yaml``);
6. ``uda``  Cluster-Contrast domain adaptation of the fine-tuned model to a second generated world whose
   people and cameras differ (``configs/uda/demo.yaml``).

The stages read folders. The generated worlds they read are rendered first, once, by :mod:`passreid.demo`
(``python -m passreid.demo --out <output-dir>``): ``world/`` (pre-training's ``pool/``, fine-tuning's
``market/``), ``monitor_world/`` (the kNN monitor's held-out pool), ``usl_world/`` and ``uda_world/`` (larger
worlds; the UDA target with other people and cameras). The summary
(``demo_metrics.json``) collects each stage's final numbers. ``--quick`` cuts every budget to a few
iterations (what the test suite runs); the numbers it prints are not meaningful.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from passreid.atomic_files import atomic_write_text
from passreid.demo import demo_data_arguments

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stage:
    """One pipeline step: an entry point with its arguments, and how to read its result."""

    name: str
    script: str
    args: Callable[[Path], list[str]]  # output root -> command-line arguments
    quick: list[str] = field(default_factory=list)  # overrides for --quick
    summarize: Callable[[Path], dict] = lambda out: {}


def last_record(metrics_file: Path, split: str) -> dict:
    """The last ``metrics.jsonl`` record of ``split`` (a stage's final evaluation)."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    matching = [record for record in records if record.get("split") == split]
    if not matching:
        raise RuntimeError(f"{metrics_file} has no '{split}' record")
    return matching[-1]


def _rank_scalars(record: dict) -> dict:
    return {key: record[key] for key in ("mAP", "rank1", "rank5", "mINP") if key in record}


def _pretrain_summary(stage_dir: Path) -> dict:
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    knn = [record for record in records if record.get("split") == "knn"]
    return {"knn_mAP_first": knn[0]["mAP"], "knn_mAP_last": knn[-1]["mAP"], "knn_evaluations": len(knn)}


def _cluster_summary(stage_dir: Path) -> dict:
    """Start and end mAP of a USL / UDA run, and the pseudo labels' ARI in the first and last epoch."""
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [record for record in records if record.get("split") == "eval"]
    clusters = [record for record in records if record.get("split") == "cluster"]
    summary = {"mAP_start": evals[0]["mAP"], "mAP": evals[-1]["mAP"], "rank1": evals[-1]["rank1"]}
    if clusters and "ari" in clusters[0]:
        summary.update(ari_first_epoch=clusters[0]["ari"], ari_last_epoch=clusters[-1]["ari"])
    return summary


def build_stages() -> list[Stage]:
    """The pipeline, in order."""
    pretrain = Stage(
        "pretrain", "pretrain/train.py",
        lambda root: ["--config-file", "configs/pretrain/demo.yaml", "--output-dir", str(root / "pretrain"),
                      *demo_data_arguments("pretrain", root)],
        quick=["train.epochs=1", "optim.warmup_epochs=1", "data.num_workers=0"],
        summarize=_pretrain_summary,
    )
    finetune_common = ["--config-file", "configs/finetune/demo.yaml"]
    finetune_quick = ["train.max_iters=8", "eval.period=100"]
    finetune = Stage(
        "finetune", "finetune/train.py",
        lambda root: [*finetune_common, "--output-dir", str(root / "finetune"), *demo_data_arguments("finetune", root),
                      f"model.pretrained={root / 'pretrain' / 'backbone_final.pth'}"],
        quick=finetune_quick,
        summarize=lambda out: _rank_scalars(last_record(out / "metrics.jsonl", "eval")),
    )
    finetune_random = Stage(
        "finetune_random", "finetune/train.py",
        lambda root: [*finetune_common, "--output-dir", str(root / "finetune_random"),
                      *demo_data_arguments("finetune", root), "model.pretrained=none"],
        quick=finetune_quick,
        summarize=lambda out: _rank_scalars(last_record(out / "metrics.jsonl", "eval")),
    )
    test = Stage(
        "test", "finetune/test.py",
        lambda root: ["--weights", str(root / "finetune" / "model_final.pth"), "--output-dir", str(root / "test"),
                      *demo_data_arguments("test", root)],
        summarize=lambda out: {key: value for key, value in json.loads((out / "metrics.json").read_text()).items()
                               if key in ("mAP", "rank1", "rank5", "mINP")},
    )
    usl = Stage(
        "usl", "usl/train.py",
        lambda root: ["--config-file", "configs/usl/demo.yaml", "--output-dir", str(root / "usl"),
                      *demo_data_arguments("usl", root),
                      f"model.pretrained={root / 'pretrain' / 'backbone_final.pth'}"],
        quick=["train.epochs=1", "train.iters=3"],
        summarize=_cluster_summary,
    )
    uda = Stage(
        "uda", "uda/train.py",
        lambda root: ["--config-file", "configs/uda/demo.yaml", "--output-dir", str(root / "uda"),
                      *demo_data_arguments("uda", root),
                      f"model.init_from={root / 'finetune' / 'model_final.pth'}"],
        quick=["train.epochs=1", "train.iters=3"],
        summarize=_cluster_summary,
    )
    return [pretrain, finetune, finetune_random, test, usl, uda]


def run_stage(stage: Stage, root: Path, quick: bool) -> dict:
    """Run one stage as a subprocess (its output streams to this terminal); fail loudly."""
    command = [sys.executable, str(REPO_ROOT / stage.script), *stage.args(root), *(stage.quick if quick else [])]
    print(f"\n=== demo stage '{stage.name}': {' '.join(command)}", flush=True)
    start = time.time()
    completed = subprocess.run(command, cwd=REPO_ROOT, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"demo stage '{stage.name}' failed with exit code {completed.returncode}; "
                         f"its log is in {root / stage.name / 'log.txt'}")
    result = {"seconds": round(time.time() - start, 1), **stage.summarize(root / stage.name)}
    print(f"=== stage '{stage.name}' done: {result}", flush=True)
    return result


def format_summary(summary: dict) -> str:
    """A short table of what each stage reached."""
    lines = ["stage               seconds  result"]
    for name, result in summary["stages"].items():
        details = ", ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                            for key, value in result.items() if key != "seconds")
        lines.append(f"{name:<18} {result['seconds']:>8.1f}  {details}")
    return "\n".join(lines)


def render_worlds(root: Path) -> None:
    """Render the demo's generated worlds into ``root`` (each is kept when already there)."""
    command = [sys.executable, "-m", "passreid.demo", "--out", str(root)]
    print(f"\n=== demo worlds: {' '.join(command)}", flush=True)
    start = time.time()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    print(f"=== demo worlds ready ({time.time() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/demo", help="root of every stage's output folder")
    parser.add_argument("--quick", action="store_true", help="a few iterations per stage (tests)")
    args = parser.parse_args(argv)
    root = Path(args.output_dir).absolute()
    root.mkdir(parents=True, exist_ok=True)

    summary: dict = {"output_dir": str(root), "quick": args.quick, "stages": {}}
    render_worlds(root)
    for stage in build_stages():
        summary["stages"][stage.name] = run_stage(stage, root, args.quick)
        atomic_write_text(root / "demo_metrics.json", json.dumps(summary, indent=2) + "\n")
    print("\n" + format_summary(summary))
    print(f"\nsummary written to {root / 'demo_metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
