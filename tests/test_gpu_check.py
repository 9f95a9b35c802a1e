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
    assert "bench/gpu_check.py --install-missing" in done.stdout
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_install_asks_only_for_what_is_missing(gpu_check):
    installed = {"torch": "2.11.0", "numpy": "2.5.2", "lmdb": "1.0.0", "pytest": "9.0.0"}
    requirements = ["torch>=2.1,!=2.13.0", "numpy>=1.24", "lmdb>=1.4", "submitit>=1.5", "pytest>=7.4"]
    assert gpu_check.missing_requirements(requirements, installed.get) == ["lmdb>=1.4", "submitit>=1.5"]
    core = gpu_check.project_requirements(("test",))
    assert any(r.startswith("lmdb") for r in core) and any(r.startswith("pytest") for r in core)
    assert gpu_check.project_requirements(("gpu",), core=False) == ["faiss-gpu>=1.15.1"]


def test_install_tries_every_missing_requirement_on_its_own(gpu_check, monkeypatch, capsys):
    # Offline, one requirement that cannot be had (here the second) must not keep the others out.
    calls = []

    def fake_pip(command):
        calls.append(command[-1])
        return subprocess.CompletedProcess(command, 1 if command[-1].startswith("setuptools") else 0)

    monkeypatch.setattr(gpu_check, "missing_requirements",
                        lambda requirements, version_of: ["lmdb>=1.4", "setuptools>=77", "submitit>=1.5"])
    monkeypatch.setattr(gpu_check.subprocess, "run", fake_pip)
    assert gpu_check.install_missing(wheels=None) == 1
    assert calls[:3] == ["lmdb>=1.4", "setuptools>=77", "submitit>=1.5"]
    assert "not installed: setuptools>=77" in capsys.readouterr().out


def test_the_check_runs_without_lmdb_submitit_and_faiss(tmp_path):
    # Where the install part cannot reach a package index (the GPU machines this project borrows), these may
    # be absent: the library, the stage scripts and the collection of the cuda tests must not need them.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("lmdb", "submitit", "faiss"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('No module named {name!r} (hidden by the test)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(REPO / "src")])}
    imports = ("import passreid, passreid.data, passreid.pretrain, passreid.finetune, passreid.usl, passreid.uda, "
               "passreid.cluster, passreid.inference")
    done = subprocess.run([sys.executable, "-c", imports], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    collect = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "--collect-only", "-q", "-p",
                              "no:cacheprovider", "tests/"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert collect.returncode == 0, collect.stdout[-2000:]
    assert "test_cuda_paths.py" in collect.stdout


def test_budgets_fit_in_eight_minutes(gpu_check, tmp_path):
    parts = gpu_check.build_plan(sys.executable, tmp_path, None, tmp_path / "no_market")
    default = [part for part in parts if not part.optional]
    optional = [part for part in parts if part.optional]
    assert sum(part.budget_s for part in default) <= gpu_check.TOTAL_BUDGET_S < 8 * 60
    # the optional parts (the step experiments) fit in one --parts run of their own
    assert optional and sum(part.budget_s for part in optional) <= gpu_check.TOTAL_BUDGET_S
    market = next(part for part in parts if part.name == "market_finetune")
    assert market.skip_reason and "Market-1501 not found" in market.skip_reason  # skipped, with the reason
    (tmp_path / "train_only" / "bounding_box_train").mkdir(parents=True)  # enough for the input-path part only
    parts = gpu_check.build_plan(sys.executable, tmp_path, None, tmp_path / "train_only")
    market = next(part for part in parts if part.name == "market_finetune")
    assert "no query, bounding_box_test" in market.skip_reason


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
            Part("works", 10, [sys.executable, "-c", "import pathlib, sys; d = pathlib.Path(sys.argv[1]); d.mkdir(); "
                                             "(d / 'model_final.pth').write_bytes(b'x'); (d / 'metrics.jsonl').touch(); "
                                             "print('fine')", str(tmp_path / "results" / "run")], "exits 0"),
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
        names = packed.getnames()
    assert "results/summary.json" in names and "results/run/metrics.jsonl" in names
    assert "results/run/model_final.pth" not in names  # checkpoints stay behind: the archive has to travel


def test_optional_parts_run_only_when_named(gpu_check, tmp_path, monkeypatch):
    Part = gpu_check.Part
    fake = [Part("always", 10, [sys.executable, "-c", "print('default part')"], "in the default plan"),
            Part("experiment", 10, [sys.executable, "-c", "print('optional part')"], "named only", optional=True)]
    monkeypatch.setattr(gpu_check, "build_plan", lambda *args: [
        Part(p.name, p.budget_s, list(p.command), p.what, optional=p.optional) for p in fake])
    assert gpu_check.main(["--results-dir", str(tmp_path / "default")]) == 0
    ran = [part["name"] for part in json.loads((tmp_path / "default" / "summary.json").read_text())["parts"]]
    assert ran == ["always"]
    assert gpu_check.main(["--results-dir", str(tmp_path / "named"), "--parts", "experiment"]) == 0
    ran = [part["name"] for part in json.loads((tmp_path / "named" / "summary.json").read_text())["parts"]]
    assert ran == ["experiment"] and "optional part" in (tmp_path / "named" / "experiment.log").read_text()
