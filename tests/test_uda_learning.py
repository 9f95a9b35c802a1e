"""Learning across generated worlds: the UDA demo recipe against the source model's direct transfer.

Strict xfail: the issue asks UDA to beat the source model's direct transfer on the target world, which the
demo recipe does not do reliably on the generated worlds (uda/README.md, "Demo"); the test turns into a
failure as soon as it passes, so that the marker is removed then."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from passreid.config import load_config
from passreid.finetune import FinetuneConfig, evaluate_model, load_finetuned_model, run_training
from passreid.usl import UslConfig, load_target_data, run_usl, to_finetune_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "open problem: on the generated world pair the demo recipe does not reliably beat direct transfer "
    "(measured: this random-init source 0.112 -> 0.067 mAP; the demo's PASS-initialised source 0.138 -> "
    "0.148, after a dip to 0.087); see uda/README.md"))
def test_uda_beats_direct_transfer(tmp_path: Path, synthetic_world: Path):
    source_cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo.yaml",
                             [f"train.output_dir={tmp_path / 'source'}", f"data.world_dir={synthetic_world}",
                              "eval.period=100"])
    source = run_training(source_cfg, resume=False).final_model

    cfg = load_config(UslConfig, REPO / "configs" / "uda" / "demo.yaml",
                      [f"train.output_dir={tmp_path / 'uda'}", f"model.init_from={source}", "eval.period=100"])
    target = load_target_data(cfg)
    model, _, _ = load_finetuned_model(source)  # the source model with its own test feature
    direct = evaluate_model(model, target.test, (128, 64), to_finetune_config(cfg), torch.device("cpu")).metrics
    result = run_usl(cfg, resume=False)
    print(f"UDA demo: direct transfer mAP {direct['mAP']:.4f}; adapted from {result.initial_metrics['mAP']:.4f} "
          f"to {result.final_metrics['mAP']:.4f}; ARI per epoch {[round(r['ari'], 3) for r in result.history]}")
    assert result.final_metrics["mAP"] > direct["mAP"]
