"""`make demo` end to end: every stage runs through its entry point and the summary collects their results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_pipeline_runs_every_stage_from_the_previous_export(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "demo.py"), "--output-dir", str(out), "--quick"],
                            capture_output=True, text=True, timeout=1800, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "demo_metrics.json").read_text())
    assert list(summary["stages"]) == ["pretrain", "finetune", "finetune_random", "test", "usl", "uda"]
    assert (out / "pretrain" / "backbone_final.pth").is_file()
    assert (out / "finetune" / "model_final.pth").is_file()
    # The fine-tuning stage really started from the pre-training export (the weight-loading report says so).
    assert "backbone_final.pth" in (out / "finetune" / "log.txt").read_text()
    for stage in ("finetune", "finetune_random", "test"):
        assert 0.0 <= summary["stages"][stage]["mAP"] <= 1.0
    assert summary["stages"]["test"]["mAP"] == pytest.approx(summary["stages"]["finetune"]["mAP"], abs=1e-6)
    assert (out / "test" / "query_features.npz").is_file()
    for stage in ("usl", "uda"):  # started from the pre-training export / the fine-tuned model
        assert (out / stage / "model_final.pth").is_file()
        assert 0.0 <= summary["stages"][stage]["mAP_start"] <= 1.0 and 0.0 <= summary["stages"][stage]["mAP"] <= 1.0
    assert "backbone_final.pth" in (out / "usl" / "log.txt").read_text()
    assert "model_final.pth" in (out / "uda" / "log.txt").read_text()
    assert "stage" in result.stdout and "finetune_random" in result.stdout
