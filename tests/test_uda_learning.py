"""Learning across generated worlds: the UDA demo recipe against the source model's direct transfer.

Issue #7: UDA from a source-trained model must beat that model's direct transfer (its own test feature, its
trained BN necks) on the target world. The source here is the fine-tuning demo recipe on the default world
(style "a"), from random init (no pre-training export, to keep the test short); the target is the UDA demo's
world (style "b", 6 cameras, rendered next to the output folder).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from passreid.config import load_config
from passreid.finetune import FinetuneConfig, evaluate_model, load_finetuned_model, run_training
from passreid.usl import UslConfig, load_target_data, run_usl, to_finetune_config

REPO = Path(__file__).resolve().parents[1]

# Adapted minus direct-transfer mAP that the test requires. Measured gains of the demo recipe (uda/README.md):
# this random-init source +1.33 points (seed 1) / +1.03 (train.seed=2); a source from a one-epoch pre-training
# export +0.76 / +2.19; the demo's source +1.85. Half a point stays below all of them.
MARGIN = 0.005


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
def test_uda_beats_direct_transfer(tmp_path: Path, synthetic_world: Path):
    source_cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo.yaml",
                             [f"train.output_dir={tmp_path / 'source'}", f"data.world_dir={synthetic_world}",
                              "eval.period=100"])
    source = run_training(source_cfg, resume=False).final_model

    cfg = load_config(UslConfig, REPO / "configs" / "uda" / "demo.yaml",
                      [f"train.output_dir={tmp_path / 'uda'}", f"model.init_from={source}", "eval.period=100"])
    target = load_target_data(cfg)
    model, _, _ = load_finetuned_model(source)  # the source model with its own test feature
    direct = evaluate_model(model, target.test, tuple(cfg.model.img_size), to_finetune_config(cfg),
                            torch.device("cpu")).metrics["mAP"]
    result = run_usl(cfg, resume=False)
    adapted = result.final_metrics["mAP"]
    print(f"UDA demo recipe: direct transfer mAP {direct:.4f}; adapted from {result.initial_metrics['mAP']:.4f} "
          f"(fresh necks) to {adapted:.4f}; ARI per epoch {[round(r['ari'], 3) for r in result.history]}")
    assert adapted > direct + MARGIN, f"adapted {adapted:.4f} vs direct transfer {direct:.4f}"
