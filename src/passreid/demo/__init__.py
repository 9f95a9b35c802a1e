"""The generated re-ID world of the demo and the tests, and the worlds ``make demo`` trains on.

The training stages read folders only; this package renders the folders they read (:mod:`passreid.demo.world`:
Market-1501-layout splits, an occluded copy with parsing masks, occluder cut-outs, an unlabeled pool). The
demo's worlds are named presets (:data:`DEMO_WORLDS`), rendered once with :func:`render_demo_world`::

    python -m passreid.demo --out runs/demo            # every preset, each in runs/demo/<name>/
    python -m passreid.demo.world --out DIR --seed 3   # one world with explicit options

and each stage is pointed at a folder of one: ``data.root=runs/demo/world/market`` (fine-tuning),
``data.root=runs/demo/world/pool`` (pre-training), ``monitor.root=runs/demo/monitor_world/pool``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from passreid.demo.world import SyntheticWorldSpec, generate_world

__all__ = ["DEMO_STAGE_DATA", "DEMO_WORLDS", "SyntheticWorldSpec", "demo_data_arguments", "generate_world",
           "render_demo_world"]

# The worlds of `make demo` (tools/demo.py): name -> spec overrides of SyntheticWorldSpec.
DEMO_WORLDS: dict[str, dict[str, Any]] = {
    # Seed 0, default spec (24 train ids / 125 images, 41 queries, 156 gallery, 4 cameras, 400 pool crops):
    # pre-training's pool/, fine-tuning's market/ and market_occluded/, the occluders/ cut-outs.
    "world": {},
    # The pre-training kNN monitor ranks the persons of a pool that training has not seen: another seed.
    "monitor_world": {"seed": 1, "occluded": False},
    # USL: the default world has 24 train ids / ~5 images each, and k-reciprocal neighbourhoods of a few images
    # follow the cameras. 100 ids x ~3 images per camera give ~9 images per id (Market: ~17) and enough
    # clusters; 48 test ids make the start -> end mAP less noisy; no occluded copy and no pool (unused).
    "usl_world": {"num_train_ids": 100, "num_test_ids": 48, "images_per_id_per_camera": 3, "occluded": False,
                  "pool_size": 0},
    # UDA target: a new site for the fine-tuned model: seed 2 (other people, 6 other cameras: backgrounds,
    # lighting, viewpoints), style "a"; 100 train ids x ~3 images per camera (1237 train images, ~12 per id; the
    # 24-id default gives ~200, too few for k-reciprocal clusters), 48 test ids (85 queries, 589 gallery); no
    # occluded copy and no pool. Style "b" (another camera palette, darker, cooler) was the target before: from
    # the ~10% mAP the demo's source transfers there, the clusters are mostly wrong (purity ~0.4, ARI <0.1) and
    # 200 iterations of adaptation ended between -2.0 and +1.85 points from direct transfer over 5 runs (also
    # with 50 ids x ~6 images per camera: 7.0 -> 5.2). Here direct transfer is ~26.5% and adaptation adds
    # +9 to +10.6 points (issue #13; figures in configs/uda/demo.yaml).
    "uda_world": {"seed": 2, "num_cameras": 6, "num_train_ids": 100, "num_test_ids": 48,
                  "images_per_id_per_camera": 3, "occluded": False, "pool_size": 0},
}


def render_demo_world(name: str, root: str | os.PathLike) -> Path:
    """Render the demo world ``name`` (:data:`DEMO_WORLDS`) into ``root/name`` unless it is there; return it."""
    if name not in DEMO_WORLDS:
        raise ValueError(f"unknown demo world {name!r}; one of {', '.join(DEMO_WORLDS)}")
    return generate_world(Path(root) / name, **DEMO_WORLDS[name])


# The folders each stage's demo recipe (configs/<stage>/demo.yaml) reads, relative to the worlds' root:
# stage -> (data root, other folder overrides).
DEMO_STAGE_DATA: dict[str, tuple[str, dict[str, str]]] = {
    "pretrain": ("world/pool", {"monitor.root": "monitor_world/pool"}),
    "finetune": ("world/market", {}),
    "test": ("world/market", {}),
    "usl": ("usl_world/market", {}),
    "uda": ("uda_world/market", {}),
}


def demo_data_arguments(stage: str, worlds_dir: str | os.PathLike) -> list[str]:
    """The command-line arguments that point ``stage``'s demo recipe at the demo worlds under ``worlds_dir``
    (``--data-root ...`` and folder overrides such as ``monitor.root=...``)."""
    if stage not in DEMO_STAGE_DATA:
        raise ValueError(f"no demo data for stage {stage!r}; one of {', '.join(DEMO_STAGE_DATA)}")
    root, others = DEMO_STAGE_DATA[stage]
    worlds = Path(worlds_dir)
    return ["--data-root", str(worlds / root), *(f"{key}={worlds / value}" for key, value in others.items())]
