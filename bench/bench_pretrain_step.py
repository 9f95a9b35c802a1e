"""Benchmark: one full PASS pre-training step (ViT-S/16 or ViT-B/16, 2 + 9 crops, 4 x 65536 heads),
optionally side by side with the published step.

    python bench/bench_pretrain_step.py [--arch vit_small] [--batch 8] [--steps 3] [--device cpu|cuda]
                                        [--precision fp32|bf16|fp16] [--reference-dir PASS-reID checkout]
    python bench/bench_pretrain_step.py --profile [--device cuda] [--trace trace.json.gz] ...  # where it goes

A step is what the training loop does per iteration: ``zero_grad``, ``PASSMetaArch.forward_backward``
(teacher on the 2 globals, student on all 11 views, 44-term loss, centre update, backward),
per-tensor gradient clipping at 3.0, ``AdamW.step`` (two parameter groups, weight decay on the
first; foreach on the CPU, fused on CUDA, as the trainer) and the teacher EMA; with ``--precision
fp16`` under autocast with a GradScaler, with ``bf16`` under bf16 autocast, as the trainer runs them.
Inputs are random tensors of the published shapes (2 x 256x128 and 9 x 128x64 per image, the same
seed for every side), so data loading is not timed. Epoch 1 is used, so the last layers are updated
(epoch 0 freezes them and would be cheaper).

Each side runs in its own fresh worker process (so its peak RSS, ``ru_maxrss``, is its own: Python,
the torch import, student + teacher, gradients, AdamW moments, activations), builds its model, takes
one untimed warm-up step, then waits; this process then orders the timed steps one at a time. With
``--reference-dir`` (a checkout of github.com/CASIA-IVA-Lab/PASS-reID, or its ``PASS`` folder) the
second worker imports the published ``main_pass.py`` (``DINOLoss``), ``utils.py``
(``MultiCropWrapper``, ``get_params_groups``, ``clip_gradients``, ``cancel_gradients_last_layer``)
and ``vision_transformer.py`` (``vit_small`` / ``vit_base`` + ``DINOHead``, as the published
scripts' ``--arch vit_small``) and times the body of its ``train_one_epoch`` on the same inputs:
steps alternate between the two workers (ours first on even steps, the published one first on odd
steps), so both see the same machine load, and the ratio of the medians is printed. Two shims make
the 2021 code import on a current torch: ``torch._six.container_abcs`` (removed from torch) is
provided as ``collections.abc``, and a one-process gloo group serves the ``dist.all_reduce`` of its
centre update. The published step runs without its DDP wrapper (one process; ours has none either),
on the CPU in fp32, on CUDA in fp16 + GradScaler (its ``--use_fp16`` default) or fp32.
Without ``--reference-dir`` only this code's absolute figures are printed, with the machine and load.

On CUDA the step is timed between ``torch.cuda.synchronize()`` calls; the model FLOPs of a step are
counted once (``torch.utils.flop_counter.FlopCounterMode`` on the warm-up step: matmuls, attention,
convolutions, forward and backward) and the model FLOP utilisation is FLOPs / step time / the GPU's
dense bf16/fp16 peak (``--peak-tflops``, or a known value for H100/H200/A100). ``--compile MODE`` runs our
student and teacher backbones through ``torch.compile`` (heads, loss and optimizer stay eager): the FLOPs
are counted on an eager step first, and the step that compiles is reported apart (``compile_step_seconds``).
``--batch-band-views`` runs our student's band views in one backbone pass (``train.batch_band_views``).
Writes ``bench/results/pretrain_step.json`` (``--out``) and prints the figures.
"""
from __future__ import annotations

import argparse
import collections.abc
import gzip
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROTOCOL = "@@bench "  # prefix of the worker's protocol lines on stdout (anything else is passed through)
#: Dense bf16 / fp16 tensor-core peaks (TFLOP/s) by GPU name, for the MFU when --peak-tflops is not given.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_rss_gb() -> float:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def make_views(batch: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """The 2 global (256x128) and 9 local (128x64) view batches, the same for every worker."""
    gen = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch, 3, 256, 128, generator=gen) for _ in range(2)] + [
        torch.randn(batch, 3, 128, 64, generator=gen) for _ in range(9)]
    return [view.to(device) for view in views]


def gpu_peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The dense bf16/fp16 peak used for the MFU, or None where it is unknown."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


# ---------------------------------------------------------------------------------------------- our step


def build_ours(args: argparse.Namespace, device: torch.device):
    """Our meta-architecture, optimizer and AMP as the trainer sets them up; returns ``step()``."""
    from passreid.engine import autocast_for
    from passreid.pretrain import PASSMetaArch

    meta = PASSMetaArch(args.arch, out_dim=args.out_dim, batch_band_views=args.batch_band_views).to(device)
    groups = meta.param_groups()
    for group in groups:
        group["weight_decay"] = 0.04 * group["wd_multiplier"]
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(groups, lr=1e-4, **kernel)
    amp = autocast_for(device, args.precision)
    views = make_views(args.batch, device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        meta.forward_backward(views, epoch=1, autocast=amp.autocast, scaler=amp.scaler)
        if amp.scaler is not None:
            amp.scaler.unscale_(optimizer)
        meta.clip_gradients(3.0)
        if amp.scaler is not None:
            amp.scaler.step(optimizer)
            amp.scaler.update()
        else:
            optimizer.step()
        meta.update_teacher(0.996)

    info = {"parameters_per_network": sum(p.numel() for p in meta.student.parameters()),
            "optimizer": f"AdamW({next(iter(kernel))})"}
    return step, info, meta.compile_backbones  # what train.compile does


# ---------------------------------------------------------------------------------------- published step


def published_folder(reference_dir: Path) -> Path:
    """The folder holding the published ``main_pass.py`` (the checkout's ``PASS/`` or the folder itself)."""
    for folder in (reference_dir / "PASS", reference_dir):
        if (folder / "main_pass.py").is_file() and (folder / "vision_transformer.py").is_file():
            return folder
    raise SystemExit(f"--reference-dir {reference_dir}: no PASS/main_pass.py there (expected a checkout of "
                     f"github.com/CASIA-IVA-Lab/PASS-reID)")


def build_published(args: argparse.Namespace, device: torch.device):
    """The published student/teacher/loss/optimizer and the body of its ``train_one_epoch``; returns ``step()``."""
    import torch.distributed as dist

    folder = published_folder(args.reference_dir)
    if "torch._six" not in sys.modules:  # removed from torch after 1.x; ours_vit.py imports container_abcs
        shim = types.ModuleType("torch._six")
        shim.container_abcs = collections.abc
        sys.modules["torch._six"] = shim
    sys.path.insert(0, str(folder))
    import main_pass  # noqa: E402  (the published module, from --reference-dir)
    import utils as pass_utils  # noqa: E402
    import vision_transformer as vits  # noqa: E402

    if args.precision == "bf16":
        raise SystemExit("the published step has no bf16 path (fp16 + GradScaler or fp32): use --precision "
                         "fp16 or fp32 with --reference-dir")
    store = tempfile.NamedTemporaryFile(prefix="bench_pass_", delete=False).name
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)

    student = vits.__dict__[args.arch](img_size=(256, 128), patch_size=16, drop_path_rate=0.1)
    teacher = vits.__dict__[args.arch](img_size=(256, 128), patch_size=16)
    embed_dim = student.embed_dim
    student = pass_utils.MultiCropWrapper(student, vits.DINOHead(embed_dim, args.out_dim, use_bn=False,
                                                                 norm_last_layer=True)).to(device)
    teacher = pass_utils.MultiCropWrapper(teacher, vits.DINOHead(embed_dim, args.out_dim, False)).to(device)
    teacher.load_state_dict(student.state_dict())
    for param in teacher.parameters():
        param.requires_grad = False
    # DINOLoss(out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
    dino_loss = main_pass.DINOLoss(args.out_dim, 11, 0.04, 0.04, 0, 100).to(device)
    optimizer = torch.optim.AdamW(pass_utils.get_params_groups(student))
    for index, group in enumerate(optimizer.param_groups):  # what its schedules set each iteration
        group["lr"] = 1e-4
        if index == 0:
            group["weight_decay"] = 0.04
    fp16_scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None
    views = make_views(args.batch, device)
    epoch, momentum = 1, 0.996

    def step() -> None:  # main_pass.train_one_epoch's loop body, minus logging and the DDP wrapper
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16_scaler is not None):
            teacher_output_g = teacher(views[:2])
            student_output = student(views)
            loss = dino_loss(teacher_output_g, *student_output, epoch)
        if not torch.isfinite(loss).item():
            raise RuntimeError("published step: non-finite loss")
        optimizer.zero_grad()
        if fp16_scaler is None:
            loss.backward()
            pass_utils.clip_gradients(student, 3.0)
            pass_utils.cancel_gradients_last_layer(epoch, student, 1)
            optimizer.step()
        else:
            fp16_scaler.scale(loss).backward()
            fp16_scaler.unscale_(optimizer)
            pass_utils.clip_gradients(student, 3.0)
            pass_utils.cancel_gradients_last_layer(epoch, student, 1)
            fp16_scaler.step(optimizer)
            fp16_scaler.update()
        with torch.no_grad():
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)

    info = {"parameters_per_network": sum(p.numel() for p in student.parameters()),
            "optimizer": "AdamW(torch default kernel)", "published_code": str(folder)}
    return step, info, None  # the published step is timed as published: never compiled


# ---------------------------------------------------------------------------------------------- a worker


def worker(args: argparse.Namespace) -> int:
    """Build one side, warm up (counting the step's FLOPs), then time a step per ``step`` line on stdin."""
    device = torch.device(args.device)
    if device.type == "cuda":  # set_device needs an index: "cuda" alone means the current device
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    rss_start = peak_rss_gb()
    step, info, compile_backbones = (build_published if args.worker == "published" else build_ours)(args, device)
    rss_built = peak_rss_gb()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed_step() -> tuple[float, float]:
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        return time.perf_counter() - start, time.process_time() - cpu_start

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:  # an eager step: compiled kernels would bypass the counter, and the FLOPs are the same
        warmup, _ = timed_step()
    flops = counter.get_total_flops()
    if compile_backbones is not None and args.compile != "none":
        compile_backbones(args.compile)
        info["compile"] = args.compile
        info["compile_step_seconds"] = round(timed_step()[0], 3)  # the first compiled step compiles
    timed_step()  # a second untimed step: the flop counter slows the first, and allocators settle
    reply = {"ready": True, "warmup_step_seconds": round(warmup, 3), "flops_per_step": flops,
             "peak_rss_after_build_gb": round(rss_built, 3), "peak_rss_at_start_gb": round(rss_start, 3), **info}
    print(PROTOCOL + json.dumps(reply), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            wall, cpu = timed_step()
            print(PROTOCOL + json.dumps({"wall": wall, "cpu": cpu}), flush=True)
        elif command == "exit":
            final = {"peak_rss_gb": round(peak_rss_gb(), 3)}
            if device.type == "cuda":
                final["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            print(PROTOCOL + json.dumps(final), flush=True)
            return 0
    return 1


class WorkerProcess:
    """One side's worker process and its line protocol."""

    def __init__(self, side: str, args: argparse.Namespace) -> None:
        self.side = side
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--arch", args.arch,
                   "--batch", str(args.batch), "--out-dim", str(args.out_dim), "--device", args.device,
                   "--precision", args.precision, "--compile", args.compile]
        if args.batch_band_views:
            command.append("--batch-band-views")
        if args.reference_dir is not None:
            command += ["--reference-dir", str(args.reference_dir)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read(self) -> dict:
        """The next protocol reply (other output of the worker is printed through)."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
            print(f"[{self.side}] {line}", end="")
        raise SystemExit(f"the {self.side} worker exited ({self.process.wait()}) before replying")

    def send(self, command: str) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()


def side_figures(ready: dict, steps: list[tuple[float, float]], final: dict, batch: int,
                 peak_tflops: float | None) -> dict:
    """One side's figures from its worker's replies."""
    walls = [wall for wall, _ in steps]
    seconds = statistics.median(walls)
    figures = {
        "seconds_per_step": round(seconds, 4),
        "step_times": [round(wall, 4) for wall in walls],
        "cpu_seconds_per_step": round(statistics.median(cpu for _, cpu in steps), 3),
        "samples_per_second": round(batch / seconds, 2),
        "warmup_step_seconds": ready["warmup_step_seconds"],
        "gflop_per_sample": round(ready["flops_per_step"] / batch / 1e9, 1),
        **{key: ready[key] for key in ("peak_rss_after_build_gb", "peak_rss_at_start_gb", "parameters_per_network",
                                       "optimizer", "compile_step_seconds") if key in ready},
        **final,
    }
    if peak_tflops:
        figures["mfu"] = round(ready["flops_per_step"] / seconds / (peak_tflops * 1e12), 4)
    return figures


# Op families of the profile: the first whose name fragment is in an op's name takes its self time.
OP_FAMILIES = (
    ("matmul (linear, mm, bmm, attention products)", ("addmm", "aten::mm", "bmm", "matmul", "linear",
                                                      "scaled_dot_product", "baddbmm")),
    ("softmax / log-softmax / cross-entropy", ("softmax", "log_softmax", "nll", "cross_entropy")),
    ("layer norm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("optimizer, clipping, EMA (foreach / elementwise over parameters)", ("_foreach", "adamw", "lerp", "norm")),
    ("copies and layout (copy_, cat, clone, contiguous, transpose)", ("copy_", "aten::cat", "clone", "contiguous",
                                                                      "transpose", "permute", "reshape", "view")),
    ("other elementwise (add, mul, div, sub, fill)", ("aten::add", "aten::mul", "aten::div", "aten::sub", "fill_",
                                                      "zero_", "aten::where", "aten::exp")),
)


def profile_ours(args: argparse.Namespace) -> int:
    """One profiled step of ours after two warm-up steps: self time by op family and the top ops (CPU time on
    the CPU; on CUDA the device time of the kernels each op launched). On CUDA also the GPU's busy share of the
    step (the kernels' summed time over the step's wall time: kernels of one stream do not overlap), the number
    of kernels, the top kernels and the ops with the most CPU time, which tell a launch-bound step from a
    compute-bound one. ``--trace FILE.json.gz`` also writes the Chrome trace (chrome://tracing, Perfetto)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    step, _, compile_backbones = build_ours(args, device)
    if args.compile != "none":
        compile_backbones(args.compile)  # compiled in the first warm-up step below

    def synchronized_step() -> None:
        step()
        if on_gpu:
            torch.cuda.synchronize(device)

    for _ in range(2):  # the first steps allocate, autotune and compile; the profiled one is a steady one
        synchronized_step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        synchronized_step()
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    op_averages = [event for event in averages if event.device_type == DeviceType.CPU]
    attribute = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = [(event.key, getattr(event, attribute) / 1e6) for event in op_averages]
    total = sum(seconds for _, seconds in events)
    families: dict[str, float] = {}
    for name, seconds in events:
        family = next((label for label, fragments in OP_FAMILIES if any(f in name for f in fragments)), "other")
        families[family] = families.get(family, 0.0) + seconds
    result = {"name": "pretrain_step_profile", "arch": args.arch, "batch": args.batch, "device": str(device),
              "precision": args.precision, "compile": args.compile, "batch_band_views": args.batch_band_views,
              "torch_threads": torch.get_num_threads(), "op_calls": sum(event.count for event in op_averages),
              "profiled_step_wall_seconds": round(wall, 4), "self_time_seconds": round(total, 4),
              "by_family": {label: {"seconds": round(seconds, 4), "share": round(seconds / total, 3)}
                            for label, seconds in sorted(families.items(), key=lambda item: -item[1])},
              "top_ops": [{"op": name, "seconds": round(seconds, 4)}
                          for name, seconds in sorted(events, key=lambda item: -item[1])[:15]]}
    if on_gpu:
        kernels = [event for event in prof.events() if event.device_type == DeviceType.CUDA]
        busy = sum(event.time_range.elapsed_us() for event in kernels) / 1e6
        result.update({
            "device_name": torch.cuda.get_device_name(device), "kernels": len(kernels),
            "gpu_busy_seconds": round(busy, 4), "gpu_busy_share": round(busy / wall, 3),
            "top_kernels": [{"kernel": event.key[:120], "calls": event.count,
                             "seconds": round(event.self_device_time_total / 1e6, 4)}
                            for event in sorted((e for e in averages if e.device_type == DeviceType.CUDA),
                                                key=lambda e: -e.self_device_time_total)[:15]],
            "top_cpu_ops": [{"op": event.key, "calls": event.count,
                             "self_cpu_seconds": round(event.self_cpu_time_total / 1e6, 4)}
                            for event in sorted(op_averages, key=lambda e: -e.self_cpu_time_total)[:15]]})
    result.update({"load_average_1min": round(os.getloadavg()[0], 2), "command": " ".join(["python", *sys.argv]),
                   "date": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if args.trace is not None:
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            raw = Path(folder) / "trace.json"
            prof.export_chrome_trace(str(raw))
            with raw.open("rb") as source, gzip.open(args.trace, "wb") as target:
                shutil.copyfileobj(source, target)
    out = args.out if args.out != RESULTS_DIR / "pretrain_step.json" else RESULTS_DIR / "pretrain_step_profile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small", choices=("vit_small", "vit_base"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after two untimed ones)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--reference-dir", type=Path, default=None,
                        help="a PASS-reID checkout: time the published step side by side and print the ratio")
    parser.add_argument("--compile", default="none",
                        choices=("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                        help="torch.compile our student and teacher backbones with this mode (ours only; the FLOPs "
                             "are counted on an eager step first, and the first compiled step is not timed)")
    parser.add_argument("--batch-band-views", action="store_true",
                        help="ours: the student's 9 band views in one backbone pass (train.batch_band_views)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for the MFU (default: known GPUs)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "pretrain_step.json")
    parser.add_argument("--profile", action="store_true",
                        help="profile one step of ours (torch.profiler) and print where its time goes, by op family")
    parser.add_argument("--trace", type=Path, default=None,
                        help="with --profile: also write the profiled step's Chrome trace (.json.gz) here")
    parser.add_argument("--worker", choices=("ours", "published"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.profile:
        return profile_ours(args)
    if args.reference_dir is not None:
        published_folder(args.reference_dir)  # fail before starting anything
    if args.batch < 1 or args.steps < 1:
        raise SystemExit("--batch and --steps must be >= 1")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    sides = ["ours"] + (["published"] if args.reference_dir is not None else [])
    load_before = os.getloadavg()[0]
    workers, ready = {}, {}
    for side in sides:  # one after the other: the builds and warm-ups do not compete for the cores
        workers[side] = WorkerProcess(side, args)
        ready[side] = workers[side].read()
    steps: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    for index in range(args.steps):
        for side in (sides if index % 2 == 0 else sides[::-1]):
            reply = workers[side].send("step")
            steps[side].append((reply["wall"], reply["cpu"]))
    final = {side: workers[side].send("exit") for side in sides}
    for side in sides:
        workers[side].process.wait()

    peak = gpu_peak_tflops(device, args.peak_tflops)
    ours = side_figures(ready["ours"], steps["ours"], final["ours"], args.batch, peak)
    result = {"name": "pretrain_step", **ours}
    if "published" in sides:
        published = side_figures(ready["published"], steps["published"], final["published"], args.batch, peak)
        result["published"] = {**published, "code": ready["published"].get("published_code")}
        result["speedup_vs_published"] = round(published["seconds_per_step"] / ours["seconds_per_step"], 2)
        result["peak_rss_ratio_vs_published"] = round(ours["peak_rss_gb"] / published["peak_rss_gb"], 2)
        result["side_by_side"] = "one run, steps interleaved (alternating order), same inputs"
    result.update({
        "arch": args.arch,
        "batch": args.batch,
        "views": "2 x 256x128 + 9 x 128x64",
        "out_dim": args.out_dim,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.precision,
        "compile": args.compile,
        "batch_band_views": args.batch_band_views,
        "peak_tflops_for_mfu": peak,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "machine": platform.machine(),
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if "published" in sides:
        print(f"side by side: ours {ours['seconds_per_step']:.3f} s/step, published "
              f"{result['published']['seconds_per_step']:.3f} s/step: {result['speedup_vs_published']}x; "
              f"peak RSS {ours['peak_rss_gb']:.2f} vs {result['published']['peak_rss_gb']:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
