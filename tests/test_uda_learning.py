"""Learning across generated worlds: the UDA demo recipe from a source model, against its direct transfer.

The source is the fine-tuning demo recipe on the default world (style "a"), from random init (no
pre-training export, to keep the test short); the target is the UDA demo's world (seed 2: other people, 6
other cameras, rendered next to the output folder). The figures below were measured with the earlier style-"b"
target; on the current one the demo recipe gains +9 to +10.6 points (configs/uda/demo.yaml), and in this
test's setting (seed 1, AVX2) direct transfer 25.07% -> adapted 37.36%, ARI 0.131-0.198 per epoch (one run).

Issue #7 asked that UDA beat the source model's direct transfer on the target. At the demo's budget (200
iterations) it does not do so reliably, and the pseudo labels improve by less than their spread (issue #13;
uda/README.md, Demo).
Measured in this test's setting, adapted minus direct-transfer mAP: +1.33 / +1.03 (seeds 1 / 2, an earlier
session), -1.06 (seed 1, the current code, on two machines), -0.49 (seed 1, ``ATEN_CPU_CAPABILITY=default``);
the pseudo labels' ARI, mean of epochs 2-10 minus epoch 1: +0.020 and +0.008 (the last two runs). Gains this
size flip with the CPU's float rounding, so they are printed, not asserted. What holds in every run, and what a
broken adaptation (collapsed features, labels that do not follow the data) would lose, is asserted: the adapted
model keeps the source's transfer, and the pseudo labels stay far from chance in every epoch.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from passreid.config import load_config
from passreid.finetune import FinetuneConfig, evaluate_model, load_finetuned_model, run_training
from passreid.uda import run_uda
from passreid.usl import UslConfig, load_target_data, to_finetune_config

REPO = Path(__file__).resolve().parents[1]

# The adapted model may end below direct transfer (measured down to -1.06 points here, -2.0 in the demo's setting),
# never far below it: random features score 2.5% on the target test split, direct transfer 10.6%.
MAX_LOSS_AGAINST_DIRECT = 0.03
# ARI of the pseudo labels against the true target ids (all train images, outliers as one class); chance is 0.
# Measured per epoch: 0.052-0.104 over the 40 epochs of four runs (this setting and the demo's).
MIN_EPOCH_ARI = 0.03


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
def test_uda_keeps_the_source_transfer_and_informative_pseudo_labels(tmp_path: Path, synthetic_world: Path,
                                                                     uda_world: Path):
    source_cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo.yaml",
                             [f"train.output_dir={tmp_path / 'source'}", f"data.root={synthetic_world}/market",
                              "eval.period=100"])
    source = run_training(source_cfg, resume=False).final_model

    cfg = load_config(UslConfig, REPO / "configs" / "uda" / "demo.yaml",
                      [f"train.output_dir={tmp_path / 'uda'}", f"data.root={uda_world / 'market'}",
                       f"model.init_from={source}", "eval.period=100"])
    target = load_target_data(cfg)
    model, _, _ = load_finetuned_model(source)  # the source model with its own test feature
    direct = evaluate_model(model, target.test, tuple(cfg.model.img_size), to_finetune_config(cfg),
                            torch.device("cpu")).metrics["mAP"]
    result = run_uda(cfg, resume=False)
    adapted = result.final_metrics["mAP"]
    ari = [record["ari"] for record in result.history]
    print(f"UDA demo recipe: direct transfer mAP {direct:.4f}; adapted from {result.initial_metrics['mAP']:.4f} "
          f"(fresh necks) to {adapted:.4f}; ARI per epoch {[round(a, 3) for a in ari]}")
    assert len(ari) == cfg.train.epochs and min(ari) > MIN_EPOCH_ARI, f"ARI per epoch {ari}"
    assert adapted > direct - MAX_LOSS_AGAINST_DIRECT, f"adapted {adapted:.4f} vs direct transfer {direct:.4f}"
