"""Learning across generated worlds: the UDA demo recipe from a source model, against its direct transfer.

The source is the fine-tuning demo recipe on the default world, from random init (no pre-training export, to
keep the test short); the target is the UDA demo's world (seed 2: other people, 6 other cameras). Issue #13
asks that adaptation beat direct transfer by a margin many times its spread across machines. On this target it
does (test mAP, direct transfer -> adapted, 10 epochs x 20 iterations):

- this test's setting, seed 1, AVX2: 25.07% -> 37.36% (+12.3 points), pseudo-label ARI 0.131-0.198 per epoch;
- the same with ``ATEN_CPU_CAPABILITY=default``: 25.07% -> 38.09% (+13.0), ARI 0.127-0.205;
- the demo's source (from the pre-training export), AVX2: 26.80% -> 37.36% (+10.6); the same with
  ``ATEN_CPU_CAPABILITY=default`` (torch's plain kernels, source trained with them too): 26.38% -> 35.47% (+9.1).

The float rounding of another CPU moved these runs by about 2 points. So the test asserts a gain of at least
4 points (under half the smallest gain measured) and pseudo labels far from chance in every epoch. The earlier
target, another camera palette ("style b"), started from ~10% transfer with pseudo labels of ARI < 0.1 and
its gains flipped sign with the machine (-2.0 to +1.85 points over 5 runs; uda/README.md, Demo).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from passreid.config import load_config
from passreid.finetune import FinetuneConfig, evaluate_model, load_finetuned_model, run_training
from passreid.uda import run_uda
from passreid.usl import UslConfig, load_target_data

REPO = Path(__file__).resolve().parents[1]

# Adapted minus direct-transfer mAP: measured +9.1 to +12.3 points (module docstring); runs moved ~2 points
# between CPU kernels.
MIN_GAIN_OVER_DIRECT = 0.04
# ARI of the pseudo labels against the true target ids (all train images, outliers as one class); chance is 0.
# Measured per epoch: 0.127-0.205 in this setting (two CPU kernels).
MIN_EPOCH_ARI = 0.06


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_uda_beats_direct_transfer_with_informative_pseudo_labels(tmp_path: Path, synthetic_world: Path,
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
    direct = evaluate_model(model, target.test, tuple(cfg.model.img_size), cfg,
                            torch.device("cpu")).metrics["mAP"]
    result = run_uda(cfg, resume=False)
    adapted = result.final_metrics["mAP"]
    ari = [record["ari"] for record in result.history]
    print(f"UDA demo recipe: direct transfer mAP {direct:.4f}; adapted from {result.initial_metrics['mAP']:.4f} "
          f"(fresh necks) to {adapted:.4f}; ARI per epoch {[round(a, 3) for a in ari]}")
    assert len(ari) == cfg.train.epochs and min(ari) > MIN_EPOCH_ARI, f"ARI per epoch {ari}"
    assert adapted > direct + MIN_GAIN_OVER_DIRECT, f"adapted {adapted:.4f} vs direct transfer {direct:.4f}"
