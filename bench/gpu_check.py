#!/usr/bin/env python
"""The GPU check: one prepared command that, in under 8 minutes on one GPU, installs what it needs, runs the
CUDA tests, measures the GPU rows of bench/README.md, fine-tunes briefly on the real Market-1501 and writes
everything under one results folder.

    bench/gpu_check.sh [--dry-run] [--parts a,b,...] [--results-dir DIR] [--archive FILE.tar.gz]
                       [--wheels DIR] [--market DIR] [--python PYTHON]
    make gpu-check                                 # the same, all parts

The plan (``--dry-run`` prints it and checks it without a GPU: every script, test file, recipe and
command-line flag it names exists, the extras it installs are declared, and the fine-tuning command's
config loads) is a list of parts run one after the other, each a subprocess with its own time budget;
a part that fails or runs out of time is recorded and the next one starts. The budgets add up to under
8 minutes, and each part is also cut at what is left of ``TOTAL_BUDGET_S``:

1. ``install``: every part runs this checkout's ``src/`` (on ``PYTHONPATH``), so only the requirements of
   passreid and its ``test`` extra that the interpreter lacks are installed (``pip install`` of each alone:
   none on an image that has them all), then faiss-gpu (the ``gpu`` extra) when no ``faiss`` is there, as a
   separate optional step. On a machine without network pass ``--wheels DIR`` (a folder of wheels:
   ``--no-index --find-links DIR``). A failed install is recorded and the check goes on: the library imports
   without lmdb, submitit and faiss, which only the LMDB reader, the launchers and the faiss kNN need.
2. ``machine``: ``nvidia-smi``, the torch / CUDA / driver versions and the packages seen (machine.log).
3. ``pytest_cuda``: ``pytest -m "cuda and not inductor" tests/`` (AMP bf16/fp16 of every stage, device-side
   multi-crop on the GPU, a one-process NCCL group, faiss GPU kNN when installed).
4. ``pretrain_*``: ``bench/bench_pretrain_step.py`` for ViT-S batch 128 and ViT-B batch 64, bf16 and fp16:
   samples/s of the PASS step alone and its model FLOP utilisation.
5. ``input_path``: ``bench/bench_multicrop_loading.py --device cuda --workers 8``: samples/s of the input
   path with 8 workers, published PIL views against the device-side path (views made on the GPU).
6. ``finetune_*``: ``bench/bench_finetune.py --device cuda --precision bf16``, ViT-S and ViT-B: fine-tuning
   images/s and feature-extraction images/s.
7. ``market_finetune``: a short real Market-1501 fine-tuning (PASS ViT-S recipe, random init, bf16, its
   schedule compressed to 6 epochs with 1 warm-up epoch: ~1,100 iterations) and its mAP on the full
   query/gallery split; data from ``--market``,
   ``PASSREID_MARKET1501`` or ``../shared/data/Market-1501-v15.09.15`` (skipped with the reason when absent).

Optional parts, run only when named in ``--parts`` (their budgets add up to under 8 minutes of their own):
``pytest_cuda_inductor`` (the tests marked cuda and inductor: ``train.compile`` on the GPU),
``pretrain_vit_small_b128_bf16_compiled`` and ``..._cudagraphs`` (the ViT-S bf16 step with its backbones
through ``torch.compile``, default mode and ``reduce-overhead``), ``..._banded`` (eager, the student's band views
in one backbone pass: ``train.batch_band_views``), ``profile_vit_small_b128_bf16_compiled`` (one profiled
compiled step: the GPU's busy share, the kernel count, a Chrome trace; the eager profile is
``bench_pretrain_step.py --profile``, committed for the H200 in ``bench/results/``).

The results folder (default ``bench/results/gpu_check/<UTC timestamp>/``) holds each part's log, the
JSON of each benchmark, the machine description (``machine.log``), and ``summary.json`` / ``summary.md`` (every
part's status, duration and headline figures). ``--archive`` also packs the folder, checkpoints left out, into
one .tar.gz. This driver uses the standard library only, so it runs before anything is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 470  # < 8 minutes for all parts together, a few seconds left for this driver
DEFAULT_MARKET = REPO.parent / "shared" / "data" / "Market-1501-v15.09.15"
# The short Market-1501 run: the recipe's schedule compressed to MARKET_EPOCHS epochs (~1,100 iterations, ~35 s
# on an H200) with one warm-up epoch, so that the learning rate reaches the recipe's 4e-4. With the recipe's own
# 20 warm-up epochs a few hundred iterations all run at 4e-6 and end at chance (mAP 0.7 %, seen 2026-12-04).
MARKET_EPOCHS = 6


@dataclass
class Part:
    """One step of the check: a command run from the repository root within ``budget_s`` seconds."""

    name: str
    budget_s: int
    command: list[str]
    what: str
    results: list[str] = field(default_factory=list)  # JSON files the command writes into the results folder
    skip_reason: str | None = None  # set when the part cannot run here (e.g. no Market-1501)
    optional: bool = False  # run only when named in --parts; not in the default 8-minute plan


def market_root(explicit: Path | None) -> Path:
    """Where the real Market-1501 is looked for (``--market``, ``PASSREID_MARKET1501``, ``../shared/data``)."""
    if explicit is not None:
        return explicit
    return Path(os.environ.get("PASSREID_MARKET1501", DEFAULT_MARKET))


def build_plan(python: str, results: Path, wheels: Path | None, market: Path) -> list[Part]:
    """Every part of the check, in order, with its command and budget."""
    install = [python, "bench/gpu_check.py", "--install-missing"]
    if wheels is not None:
        install += ["--wheels", str(wheels)]
    parts = [
        Part("install", 40, install, "pip install what passreid[test] lacks here, then faiss-gpu (optional); "
                                     "the check goes on if it fails"),
        Part("machine", 10, [python, "bench/gpu_check.py", "--describe-machine"],
             "machine description: nvidia-smi, torch / CUDA / cuDNN, CPUs, packages present"),
        Part("pytest_cuda", 70, [python, "-m", "pytest", "-m", "cuda and not inductor", "-q", "-p", "no:cacheprovider",
                                 "tests/", f"--junitxml={results / 'pytest_cuda.xml'}"],
             "the tests marked cuda (AMP of every stage, device multi-crop, NCCL, faiss GPU)"),
    ]
    for arch, batch in (("vit_small", 128), ("vit_base", 64)):
        for precision in ("bf16", "fp16"):
            name = f"pretrain_{arch}_b{batch}_{precision}"
            parts.append(Part(
                name, 32, [python, "bench/bench_pretrain_step.py", "--device", "cuda", "--arch", arch, "--batch",
                           str(batch), "--precision", precision, "--steps", "6", "--out", str(results / f"{name}.json")],
                f"PASS step alone, {arch} batch {batch} {precision}: samples/s and MFU", [f"{name}.json"]))
    parts += step_experiments(python, results)
    parts.append(Part(
        "input_path", 55, [python, "bench/bench_multicrop_loading.py", "--device", "cuda", "--workers", "8",
                           "--images", "512", "--batch", "64", "--sizes", "128x256", "--loader-epochs", "3",
                           "--device-threads", "4", "--market", str(market),
                           "--out", str(results / "input_path.json")],
        "input path with 8 workers: published PIL views vs device-side views (samples/s), CPU-ms per sample",
        ["input_path.json"]))
    for arch in ("vit_small", "vit_base"):
        name = f"finetune_{arch}_bf16"
        parts.append(Part(
            name, 25, [python, "bench/bench_finetune.py", "--device", "cuda", "--precision", "bf16", "--arch", arch,
                       "--steps", "5", "--out", str(results / f"{name}.json")],
            f"fine-tuning and feature-extraction images/s, {arch} bf16", [f"{name}.json"]))
    market_part = Part(
        "market_finetune", 116, [python, "finetune/train.py", "--config-file",
                                "configs/finetune/market1501/pass_vit_s_256.yaml", "--output-dir",
                                str(results / "market_finetune"), "--data-root", str(market), "--no-resume",
                                "model.pretrained=none", "train.device=cuda", "train.precision=bf16",
                                f"train.epochs={MARKET_EPOCHS}", "optim.warmup_epochs=1", "data.num_workers=8",
                                "train.log_period=100"],
        f"real Market-1501: {MARKET_EPOCHS} epochs (1 of warm-up) of PASS ViT-S fine-tuning from random init, "
        "then mAP")
    absent = [split for split in ("bounding_box_train", "query", "bounding_box_test") if not (market / split).is_dir()]
    if absent:  # the input-path part needs bounding_box_train only: a copy of that folder alone serves it
        market_part.skip_reason = (f"Market-1501 not found at {market} (no {', '.join(absent)}; pass --market or set "
                                   "PASSREID_MARKET1501)")
    parts.append(market_part)
    return parts


def step_experiments(python: str, results: Path) -> list[Part]:
    """Optional parts (``--parts``) for ``train.compile`` and the ViT-S bf16 step: the tests marked cuda and
    inductor, the step with the backbones compiled (``torch.compile``, then also with CUDA graphs), the eager step
    with the band views batched (``train.batch_band_views``), the compiled step's profile. Inductor caches what it compiles on the machine, so the later compiled parts reuse the
    first one's kernels; these parts' budgets add up to <= 8 min."""
    step = [python, "bench/bench_pretrain_step.py", "--device", "cuda", "--arch", "vit_small", "--batch", "128",
            "--precision", "bf16"]
    timed = [*step, "--steps", "6"]
    parts = [
        Part("pytest_cuda_inductor", 90, [python, "-m", "pytest", "-m", "cuda and inductor", "-q", "-p",
                                          "no:cacheprovider", "tests/",
                                          f"--junitxml={results / 'pytest_cuda_inductor.xml'}"],
             "train.compile on the GPU: the compiled step against the eager one, a compiled pre-training run"),
        Part("pretrain_vit_small_b128_bf16_compiled", 150,
             [*timed, "--compile", "default", "--out", str(results / "pretrain_vit_small_b128_bf16_compiled.json")],
             "PASS step, ViT-S batch 128 bf16, backbones through torch.compile: samples/s and MFU",
             ["pretrain_vit_small_b128_bf16_compiled.json"]),
        Part("pretrain_vit_small_b128_bf16_cudagraphs", 100,
             [*timed, "--compile", "reduce-overhead", "--out",
              str(results / "pretrain_vit_small_b128_bf16_cudagraphs.json")],
             "the same with CUDA graphs (torch.compile mode reduce-overhead)",
             ["pretrain_vit_small_b128_bf16_cudagraphs.json"]),
        Part("pretrain_vit_small_b128_bf16_banded", 32,
             [*timed, "--batch-band-views", "--out", str(results / "pretrain_vit_small_b128_bf16_banded.json")],
             "the eager step with the student's 9 band views in one backbone pass (train.batch_band_views)",
             ["pretrain_vit_small_b128_bf16_banded.json"]),
        Part("profile_vit_small_b128_bf16_compiled", 80,
             [*step, "--profile", "--compile", "default", "--out",
              str(results / "profile_vit_small_b128_bf16_compiled.json"), "--trace",
              str(results / "profile_vit_small_b128_bf16_compiled_trace.json.gz")],
             "one profiled step, backbones compiled: the GPU's busy share, kernels, where the time goes; Chrome trace",
             ["profile_vit_small_b128_bf16_compiled.json"]),
    ]
    for part in parts:
        part.optional = True
    return parts


def missing_requirements(requirements: list[str], version_of) -> list[str]:
    """The requirements (PEP 508 strings) that ``version_of(name) -> str | None`` says are absent or in a
    version the requirement excludes. Version ranges are checked where ``packaging`` is importable."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        Requirement = None
    missing = []
    for requirement in requirements:
        if Requirement is not None:
            parsed = Requirement(requirement)
            name, specifier = parsed.name, parsed.specifier
        else:
            name, specifier = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0], None
        version = version_of(name)
        if version is None or (specifier is not None and not specifier.contains(version, prereleases=True)):
            missing.append(requirement)
    return missing


def project_requirements(extras: tuple[str, ...], core: bool = True) -> list[str]:
    """passreid's dependencies (unless not ``core``) and those of ``extras``, from pyproject.toml."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra_requirements = [r for extra in extras for r in project["optional-dependencies"][extra]]
    return [*(project["dependencies"] if core else []), *extra_requirements]


def install_missing(wheels: Path | None) -> int:
    """The ``install`` part: pip-install what passreid[test] lacks, then faiss-gpu if no faiss is there."""
    from importlib import metadata

    def version_of(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    pip = [sys.executable, "-m", "pip", "install", "--retries", "0", "--timeout", "10"]
    if wheels is not None:
        pip += ["--no-index", "--find-links", str(wheels)]
    needed = missing_requirements(project_requirements(("test",)), version_of)
    print("passreid[test] requirements missing here:", ", ".join(needed) or "none", flush=True)
    failed = []
    for requirement in needed:  # one at a time: one that cannot be had (offline) must not block the others
        done = subprocess.run([*pip, requirement]).returncode
        print(f"installing {requirement}:", "worked" if done == 0 else f"failed (exit status {done})", flush=True)
        if done != 0:
            failed.append(requirement)
    if version_of("faiss-cpu") or version_of("faiss-gpu") or version_of("faiss-gpu-cu12"):
        print("faiss is installed: kept (faiss-gpu is not installed beside it)")
    else:
        for requirement in project_requirements(("gpu",), core=False):
            done = subprocess.run([*pip, requirement]).returncode
            print(f"installing {requirement}:", "worked" if done == 0 else
                  f"failed (exit status {done}): the faiss GPU test will skip", flush=True)
    if failed:
        print("not installed:", ", ".join(failed), flush=True)
    return 1 if failed else 0


def describe_machine() -> int:
    """Print what the figures were taken on: nvidia-smi, Python, torch, CUDA, cuDNN, GPUs, CPUs, packages."""
    import importlib.util
    import platform

    for command in (["nvidia-smi"], ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,"
                                                    "power.limit", "--format=csv"]):
        try:
            print(subprocess.run(command, capture_output=True, text=True, timeout=20).stdout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"{command[0]}: {exc}")
    print("python", platform.python_version(), "on", platform.platform())
    print("cpus", os.cpu_count(), "load average", os.getloadavg())
    import torch

    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
    print("gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    print("bf16 supported", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    for module in ("passreid", "lmdb", "submitit", "faiss", "pytest", "timm", "torchvision"):
        spec = importlib.util.find_spec(module)
        print(f"{module}: {'present at ' + str(spec.origin) if spec else 'missing'}")
    if importlib.util.find_spec("faiss"):
        import faiss

        print("faiss", faiss.__version__, "GPUs seen by faiss", getattr(faiss, "get_num_gpus", lambda: 0)())
    return 0


# ------------------------------------------------------------------------------------------------ dry run


def _script_of(command: list[str]) -> Path | None:
    """The repository script a ``python <script> ...`` command runs, if any."""
    for arg in command[1:3]:
        if arg.endswith(".py"):
            return REPO / arg
    return None


def check_plan(parts: list[Part], python: str) -> list[str]:
    """Problems with the plan that can be seen without a GPU (empty when it is ready to run)."""
    problems = []
    for label, chosen in (("the default parts'", [p for p in parts if not p.optional]),
                          ("the optional parts'", [p for p in parts if p.optional])):
        if sum(part.budget_s for part in chosen) > TOTAL_BUDGET_S:
            problems.append(f"{label} budgets add up to {sum(p.budget_s for p in chosen)} s > {TOTAL_BUDGET_S} s")
    for part in parts:
        script = _script_of(part.command)
        if script is not None:
            if not script.is_file():
                problems.append(f"{part.name}: {script.relative_to(REPO)} does not exist")
                continue
            source = script.read_text()
            for flag in (arg for arg in part.command if arg.startswith("--")):
                # a bench script declares its flags with add_argument("--flag"; the stage commands use the
                # shared parser of passreid.config.cli (checked below by loading the config)
                if "bench/" in str(script) and f'"{flag}"' not in source:
                    problems.append(f"{part.name}: {script.relative_to(REPO)} has no option {flag}")
        for arg in part.command:
            if arg.startswith("configs/") and not (REPO / arg).is_file():
                problems.append(f"{part.name}: recipe {arg} does not exist")
    pyproject = (REPO / "pyproject.toml").read_text()
    for needed in ('test = [', 'gpu = ["faiss-gpu', '"cuda: '):
        if needed not in pyproject:
            problems.append(f"pyproject.toml lacks {needed!r} (extras test/gpu, pytest marker cuda)")
    cuda_tests = [path for path in sorted((REPO / "tests").glob("test_*.py"))
                  if "pytest.mark.cuda" in path.read_text()]
    if not any(path.name == "test_cuda_paths.py" for path in cuda_tests):
        problems.append("tests/test_cuda_paths.py (the tests marked cuda) is missing")
    market = next(part for part in parts if part.name == "market_finetune")
    # The fine-tuning command's config must load: same arguments plus --print-config (no data is read).
    env = child_env()
    probe = subprocess.run([python, *market.command[1:], "--print-config"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        problems.append(f"market_finetune: the config does not load: {probe.stderr.strip()[-400:]}")
    return problems


def print_plan(parts: list[Part], results: Path) -> None:
    print(f"GPU check plan: {len(parts)} parts, budgets {sum(p.budget_s for p in parts)} s in all "
          f"(cut at {TOTAL_BUDGET_S} s); results in {results}")
    for index, part in enumerate(parts, 1):
        note = f"   [skipped: {part.skip_reason}]" if part.skip_reason else ""
        print(f"{index:2d}. {part.name:38s} {part.budget_s:4d} s  {part.what}{note}")
        print(f"      $ {shlex.join(part.command)}")


# ------------------------------------------------------------------------------------------------ running


def child_env() -> dict[str, str]:
    """The environment of every part: this checkout's sources first, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_part(part: Part, results: Path, limit_s: float) -> dict:
    """Run one part with its output in ``<results>/<name>.log``; never raises for the part's failure."""
    log_path = results / f"{part.name}.log"
    record = {"name": part.name, "budget_s": part.budget_s, "command": shlex.join(part.command), "log": log_path.name}
    if part.skip_reason:
        log_path.write_text(f"skipped: {part.skip_reason}\n")
        return {**record, "status": "skipped", "reason": part.skip_reason, "seconds": 0.0}
    start = time.perf_counter()
    with log_path.open("w") as log:
        log.write(f"$ {shlex.join(part.command)}\n")
        log.flush()
        process = subprocess.Popen(part.command, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own process group: a timeout ends its children too
        try:
            returncode = process.wait(timeout=limit_s)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop_group(process)
            returncode, status = None, "timed out"
    seconds = time.perf_counter() - start
    return {**record, "status": status, "returncode": returncode, "seconds": round(seconds, 1),
            "limit_s": round(limit_s, 1)}


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the part's process group, SIGKILL it 5 s later if still there."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ------------------------------------------------------------------------------------------------ summary


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def headline(record: dict, results: Path) -> str:
    """The part's main figures as one line (empty when it wrote none)."""
    name = record["name"]
    if name.startswith("pretrain_"):
        data = _load(results / f"{name}.json")
        if data:
            mfu = f", MFU {100 * data['mfu']:.1f} %" if data.get("mfu") is not None else ""
            compiled = (f", first compiled step {data['compile_step_seconds']} s"
                        if data.get("compile_step_seconds") is not None else "")
            return (f"{data['samples_per_second']:.0f} samples/s ({data['seconds_per_step'] * 1000:.0f} ms/step, "
                    f"{data['gflop_per_sample']} GFLOP/sample{mfu}, peak {data.get('peak_gpu_memory_gb', '?')} GB"
                    f"{compiled})")
    if name.startswith("profile_"):
        data = _load(results / f"{name}.json")
        if data and data.get("gpu_busy_share") is not None:
            top = next(iter(data["by_family"]))
            return (f"step {data['profiled_step_wall_seconds'] * 1000:.0f} ms profiled, GPU busy "
                    f"{100 * data['gpu_busy_share']:.0f} %, {data['kernels']} kernels; most device time: {top}")
    if name == "input_path":
        data = _load(results / "input_path.json")
        if data:
            row = next(iter(data["sizes"].values()))
            loader = row["loader"]
            return (f"{loader['workers']} workers: published views {loader['published_samples_s']} samples/s, "
                    f"device-side views {loader['device_path_samples_s']} samples/s; worker CPU "
                    f"{row['published']['total_ms']} vs {row['device_worker']['total_ms']} ms/sample")
    if name.startswith("finetune_"):
        data = _load(results / f"{name}.json")
        if data:
            return (f"training {data['train_images_per_s']} images/s, extraction {data['extract_images_per_s']} "
                    f"images/s (peak {data.get('peak_gpu_memory_gb')} GB)")
    if name == "market_finetune":
        metrics = results / "market_finetune" / "metrics.jsonl"
        if metrics.is_file():
            evals = [json.loads(line) for line in metrics.read_text().splitlines() if '"eval"' in line]
            evals = [r for r in evals if r.get("split") == "eval"]
            if evals:
                return f"mAP {100 * evals[-1]['mAP']:.1f} %, rank-1 {100 * evals[-1].get('rank1', float('nan')):.1f} %"
    if name.startswith("pytest_cuda"):
        log = (results / record["log"]).read_text(errors="replace")
        counts = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*=*\s*$", log, flags=re.M)
        return counts[-1] if counts else ""
    return ""


def write_summary(results: Path, records: list[dict], started: str, total_s: float) -> None:
    for record in records:
        record["headline"] = headline(record, results)
    summary = {"started": started, "total_seconds": round(total_s, 1), "parts": records}
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# GPU check {started}", "", f"Total {total_s:.0f} s. Machine: machine.log.", "",
             "| part | status | seconds (budget) | figures |", "|---|---|---|---|"]
    for record in records:
        status = record["status"] + (f" (rc {record['returncode']})" if record.get("returncode") not in (0, None) else "")
        if record["status"] == "skipped":
            status += f": {record['reason']}"
        lines.append(f"| {record['name']} | {status} | {record['seconds']} ({record['budget_s']}) | "
                     f"{record['headline']} |")
    (results / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def pack_results(results: Path, archive: Path) -> None:
    """Pack the results folder into ``archive`` (.tar.gz) without the fine-tuning checkpoints (``*.pth``): the
    figures and logs are kilobytes, a ViT-S checkpoint is hundreds of megabytes, and an archive is meant to
    travel back from a GPU machine whose returned files are capped (16 MiB each on this project's device)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as packed:
        packed.add(results, arcname=results.name,
                   filter=lambda member: None if member.name.endswith(".pth") else member)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print and check the plan; run nothing (no GPU needed)")
    parser.add_argument("--parts", default="",
                        help="comma-separated part names to run (default: every part but the optional ones)")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="results folder (default: bench/results/gpu_check/<UTC timestamp>)")
    parser.add_argument("--archive", type=Path, default=None,
                        help="also pack the results folder (without checkpoints) into this .tar.gz")
    parser.add_argument("--wheels", type=Path, default=None, help="install offline from this folder of wheels")
    parser.add_argument("--market", type=Path, default=None, help="Market-1501 root (default: PASSREID_MARKET1501 "
                                                                   "or ../shared/data/Market-1501-v15.09.15)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for every part (default: this one)")
    parser.add_argument("--describe-machine", action="store_true", help=argparse.SUPPRESS)  # the machine part
    parser.add_argument("--install-missing", action="store_true", help=argparse.SUPPRESS)  # the install part
    args = parser.parse_args(argv)
    if args.describe_machine:
        return describe_machine()
    if args.install_missing:
        return install_missing(args.wheels)

    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results = (args.results_dir or REPO / "bench" / "results" / "gpu_check" / started).resolve()
    parts = build_plan(args.python, results, args.wheels, market_root(args.market).resolve())
    if args.parts:
        wanted = [name.strip() for name in args.parts.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {part.name for part in parts})
        if unknown:
            print(f"unknown part(s) {', '.join(unknown)}; the parts are: {', '.join(p.name for p in parts)}",
                  file=sys.stderr)
            return 2
        parts = [part for part in parts if part.name in wanted]
    else:
        optional = [part.name for part in parts if part.optional]
        parts = [part for part in parts if not part.optional]
        print(f"optional parts, run only when named in --parts: {', '.join(optional)}")

    print_plan(parts, results)
    if args.dry_run:
        problems = check_plan(build_plan(args.python, results, args.wheels, market_root(args.market).resolve()),
                              args.python)
        for problem in problems:
            print(f"PLAN ERROR: {problem}", file=sys.stderr)
        print("dry run: the plan is ready to run" if not problems else f"dry run: {len(problems)} problem(s)")
        return 1 if problems else 0

    results.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records = []
    for part in parts:
        left = TOTAL_BUDGET_S - (time.perf_counter() - start)
        if left < 5 and not part.skip_reason:
            records.append({"name": part.name, "budget_s": part.budget_s, "command": shlex.join(part.command),
                            "status": "skipped", "reason": "no time left in the total budget", "seconds": 0.0,
                            "log": f"{part.name}.log"})
            (results / f"{part.name}.log").write_text("skipped: no time left in the total budget\n")
            continue
        print(f"== {part.name} (budget {part.budget_s} s): {shlex.join(part.command)}", flush=True)
        record = run_part(part, results, min(part.budget_s, left))
        print(f"   {record['status']} in {record['seconds']} s", flush=True)
        records.append(record)
    total = time.perf_counter() - start
    write_summary(results, records, started, total)
    if args.archive is not None:
        pack_results(results, args.archive)
        print(f"packed {results} into {args.archive} (checkpoints left out)")
    return 0 if all(record["status"] in ("ok", "skipped") for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
