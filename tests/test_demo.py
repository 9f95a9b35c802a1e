"""`make demo` end to end: the demo script runs on the generated world and writes its summary."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "demo.py"), "--output-dir", str(out)],
        capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "demo_metrics.json").read_text())
    for name in ("query", "gallery", "train"):
        assert (out / f"features_{name}.npz").is_file()
    assert 0.0 <= summary["random_init"]["mAP"] <= 1.0
    assert summary["clustering"]["clusters"] >= 0
    log = (out / "log.txt").read_text()
    assert "Rank-1" in log and "mAP" in log
