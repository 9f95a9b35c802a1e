"""bench/gpu_check.py: the plan checks out without a GPU (--dry-run), a part that fails or outruns its budget
is recorded and does not stop the others, and the results folder gets its summary (and archive)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


def running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_dry_run_checks_the_plan_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--results-dir", str(tmp_path / "r")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dry run: the plan is ready to run" in done.stdout
    for part in ("install", "machine", "pytest_cuda", "pretrain_vit_small_b128_bf16", "pretrain_vit_base_b64_fp16",
                 "input_path", "finetune_vit_base_bf16", "market_finetune"):
        assert part in done.stdout
    assert "pip install --no-build-isolation" in done.stdout and "'.[test,gpu]'" in done.stdout
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_budgets_fit_in_eight_minutes(gpu_check, tmp_path):
    parts = gpu_check.build_plan(sys.executable, tmp_path, None, tmp_path / "no_market")
    assert sum(part.budget_s for part in parts) <= gpu_check.TOTAL_BUDGET_S < 8 * 60
    market = next(part for part in parts if part.name == "market_finetune")
    assert market.skip_reason and "Market-1501 not found" in market.skip_reason  # skipped, with the reason


def test_dry_run_reports_a_missing_script(gpu_check, tmp_path):
    parts = gpu_check.build_plan(sys.executable, tmp_path, None, tmp_path)
    parts[3].command[1] = "bench/no_such_script.py"
    parts[4].command.append("--no-such-flag")
    problems = gpu_check.check_plan(parts, sys.executable)
    assert any("bench/no_such_script.py does not exist" in problem for problem in problems)
    assert any("has no option --no-such-flag" in problem for problem in problems)


def test_a_failed_or_timed_out_part_does_not_stop_the_others(gpu_check, tmp_path, monkeypatch):
    pid_file = tmp_path / "child.pid"
    hang = ("import subprocess, sys, time; child = subprocess.Popen(['sleep', '60']); "
            f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    Part = gpu_check.Part
    fake = [Part("fails", 10, [sys.executable, "-c", "raise SystemExit(3)"], "exits 3"),
            Part("hangs", 2, [sys.executable, "-c", hang], "outruns its budget, with a child"),
            Part("works", 10, [sys.executable, "-c", "print('fine')"], "exits 0"),
            Part("absent", 10, ["true"], "cannot run here", skip_reason="no data here")]
    monkeypatch.setattr(gpu_check, "build_plan", lambda *args: [Part(p.name, p.budget_s, list(p.command), p.what,
                                                                     skip_reason=p.skip_reason) for p in fake])
    results, archive = tmp_path / "results", tmp_path / "check.tar.gz"
    start = time.perf_counter()
    status = gpu_check.main(["--results-dir", str(results), "--archive", str(archive)])
    # The hanging part is stopped at its 2 s budget (+ up to 5 s for SIGTERM), not after 60 s.
    assert time.perf_counter() - start < 30
    assert status == 1  # not every part succeeded
    summary = json.loads((results / "summary.json").read_text())
    assert [(p["name"], p["status"]) for p in summary["parts"]] == [
        ("fails", "failed"), ("hangs", "timed out"), ("works", "ok"), ("absent", "skipped")]
    assert summary["parts"][0]["returncode"] == 3
    assert "fine" in (results / "works.log").read_text()
    child = int(pid_file.read_text())
    for _ in range(50):  # the part's own child was ended with it (its process group)
        if not running(child):
            break
        time.sleep(0.1)
    assert not running(child)
    assert "| hangs | timed out |" in (results / "summary.md").read_text()
    with tarfile.open(archive) as packed:
        assert "results/summary.json" in packed.getnames()
