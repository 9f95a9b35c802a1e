"""bench/bench_pretrain_step.py --profile: the command bench/README.md quotes for "where the step's time goes"
runs, attributes the profiled step's time to op families, and writes a readable Chrome trace."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_profile_attributes_the_step_and_writes_its_trace(tmp_path):
    out, trace = tmp_path / "profile.json", tmp_path / "trace" / "step.json.gz"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_pretrain_step.py"), "--profile", "--arch",
                           "vit_small", "--batch", "1", "--out-dim", "256", "--out", str(out), "--trace", str(trace)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["profiled_step_wall_seconds"] > 0
    shares = [family["share"] for family in result["by_family"].values()]
    # each share is rounded to 3 decimals, so their sum is 1 within one rounding step per family
    assert abs(sum(shares) - 1.0) <= 0.0005 * len(shares) + 1e-9
    assert any(family.startswith("matmul") for family in result["by_family"])
    assert result["top_ops"] and all(op["seconds"] >= 0 for op in result["top_ops"])
    with gzip.open(trace, "rt") as packed:
        events = json.load(packed)["traceEvents"]
    assert any(event.get("name") == "aten::mm" or event.get("name") == "aten::addmm" for event in events)
