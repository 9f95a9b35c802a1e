"""A few fine-tuning iterations on real Market-1501 images (skipped when the dataset is absent)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from passreid.config import load_config
from passreid.engine import Checkpointer
from passreid.finetune import FinetuneConfig, load_finetuned_model, run_training

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.realdata
@pytest.mark.slow
def test_short_run_on_real_market1501(market1501_root: Path, tmp_path: Path):
    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "market1501" / "pass_vit_s_256.yaml", [
        f"train.output_dir={tmp_path}", f"data.root={market1501_root}",
        "model.arch=vit_tiny", "model.img_size=[128,64]",  # tiny model, small input: a CPU smoke run
        "data.max_train_ids=8", "data.max_test_ids=4", "data.batch_size=16", "data.num_instances=4",
        "data.num_workers=0", "train.max_iters=2", "train.log_period=1", "train.device=cpu",
        "train.precision=fp32", "model.pretrained=none",
    ])
    result = run_training(cfg, resume=False)
    assert result.iterations == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["loss"]) for r in train)
    assert train[0]["lr"] == pytest.approx(4e-4 * 0.01)  # PASS stepping: the first epoch at warmup_lr_init
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == 1 and 0.0 <= evals[0]["mAP"] <= 1.0
    log = (tmp_path / "log.txt").read_text()
    assert "dataset market1501" in log and "train restricted to the first 8 identities" in log
    state = Checkpointer(tmp_path).load()
    assert state["iteration"] == 2 and state["sampler"]["position"] == 2 * 16
    model, _, _ = load_finetuned_model(tmp_path / "model_final.pth")
    assert model.head.classifier.weight.shape[0] == 8  # the 8 kept identities
