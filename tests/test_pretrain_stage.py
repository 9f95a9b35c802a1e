"""The pre-training stage end to end on generated data (CPU): learning, exact resume, DDP, schedules, export."""
from __future__ import annotations

import contextlib
import datetime
import importlib.util
import io
import json
import math
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest

from _ports import free_port
from _spawn import leave_group_after, start_workers, wait_for_workers
import torch

from passreid.config import ConfigError, load_config
from passreid.data import CorruptImageError, ImageItem
from passreid.data.multicrop import MultiCropAugmentation
from passreid.engine import seed_everything
from passreid.models import build_vit, load_pretrained
from passreid.pretrain.config import PretrainConfig
from passreid.pretrain.meta_arch import MultiCropNetwork, PASSMetaArch
from passreid.pretrain.data import MultiCropDataset, collate_views
from passreid.pretrain.trainer import PretrainTrainer, build_schedules, peak_learning_rate, run_pretraining

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = REPO_ROOT / "configs" / "pretrain"
DEMO = RECIPES / "demo.yaml"

# A model and crops small enough for several CPU steps per second (resume and DDP tests).
TINY = [
    "model.arch=vit_tiny", "model.img_size=[64,32]", "model.out_dim=256", "model.hidden_dim=128",
    "model.bottleneck_dim=64", "crops.global_size=[64,32]", "crops.local_size=[32,16]",
    "monitor.period=0", "train.log_period=1", "train.precision=fp32", "train.device=cpu",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(config_file: Path | None, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, config_file, list(overrides))


def _train_records(output_dir: Path, split: str = "train") -> dict[int, dict]:
    """The valid (last) metrics.jsonl record per step of ``split``."""
    records: dict[int, dict] = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == split:
            records[record["step"]] = record
    return records


def _pool_file_list(world: Path, tmp_path: Path, count: int) -> Path:
    pool = world / "pool"
    images = sorted(pool.rglob("*.jpg"))[:count]
    assert len(images) == count
    listing = tmp_path / "pool_list.txt"
    listing.write_text("".join(f"{image.relative_to(pool)}\n" for image in images))
    return listing


# ----------------------------------------------------------------------------- config and schedules


def test_recipes_carry_the_published_settings():
    pass_s = _load(RECIPES / "pass_vit_s_lup.yaml", "data.root=/data/lup")
    assert (pass_s.model.arch, pass_s.data.batch_size_per_gpu, pass_s.train.epochs) == ("vit_small", 128, 100)
    assert peak_learning_rate(pass_s, world_size=8) == pytest.approx(2e-3)
    assert (pass_s.crops.mode, pass_s.crops.local_crops_number, pass_s.model.out_dim) == ("pass", 9, 65536)
    pass_b = _load(RECIPES / "pass_vit_b_lup.yaml", "data.root=/data/lup")
    assert (pass_b.model.arch, pass_b.data.batch_size_per_gpu) == ("vit_base", 64)
    assert peak_learning_rate(pass_b, world_size=8) == pytest.approx(1e-3)
    dino = _load(RECIPES / "dino_vit_s_lup.yaml", "data.root=/data/lup")
    assert (dino.crops.mode, dino.model.arch, dino.monitor.feature) == ("dino", "vit_small", "cls")
    # TransReID-SSL dino/script/vit-s_full_lup.sh keeps main_dino.py's --batch_size_per_gpu 64 on 8 GPUs.
    assert dino.data.batch_size_per_gpu == 64 and peak_learning_rate(dino, world_size=8) == pytest.approx(1e-3)
    # --use_fp16 defaults to True in PASS main_pass.py and TransReID-SSL main_dino.py: fp16 + GradScaler.
    assert pass_s.train.precision == pass_b.train.precision == dino.train.precision == "fp16"
    demo = _load(DEMO)
    assert (demo.model.arch, demo.data.dataset, tuple(demo.crops.global_size)) == ("vit_tiny", "image_folder", (128, 64))


@pytest.mark.parametrize("overrides, message", [
    (["crops.local_crops_number=8", "data.root=/x"], "config key 'crops.local_crops_number': must be 9 in PASS mode"),
    ([], "config key 'data.root': is empty: pass --data-root"),
    (["data.root=/x", "optim.warmup_epochs=20", "train.epochs=5"], "config key 'optim.warmup_epochs': must be in"),
    (["data.root=/x", "train.device=gpu"], "config key 'train.device': must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["data.root=/x", "crops.mode=dino", "train.batch_band_views=true"],
     "config key 'train.batch_band_views': applies to crops.mode=pass only"),
    (["data.root=/x", "crops.mode=dino", "crops.local_crops_number=0"], "'crops.local_crops_number': must be >= 1"),
    (["data.root=/x", "crops.local_size=[7,7]"], r"'crops.local_size': must be at least 16x16 .*, got 7x7"),
    (["data.root=/x", "loss.student_temp=0"], "'loss.student_temp': must be > 0"),
    (["data.root=/x", "loss.teacher_temp=-1"], "'loss.teacher_temp': must be > 0"),
    (["data.root=/x", "loss.warmup_teacher_temp_epochs=-1"], "'loss.warmup_teacher_temp_epochs': must be in"),
    (["data.root=/x", "train.seed=-1"], r"'train.seed': must be in \[0, 2\*\*32 - 1\]"),
    (["data.root=/x", "monitor.dataset=foo"], "'monitor.dataset': must be one of .*generated_pool.*market1501"),
])
def test_invalid_config_is_refused_naming_the_key(tmp_path, overrides, message):
    cfg = _load(None, f"train.output_dir={tmp_path}", *overrides)
    with pytest.raises(ConfigError, match=message):
        run_pretraining(cfg)


def test_a_batch_larger_than_the_data_is_a_config_error(synthetic_world, tmp_path):
    listing = _pool_file_list(synthetic_world, tmp_path, count=24)
    cfg = _load(None, *TINY, f"train.output_dir={tmp_path / 'out'}", f"data.root={synthetic_world / 'pool'}",
                f"data.file_list={listing}", "data.batch_size_per_gpu=32", "data.num_workers=0")
    with pytest.raises(ConfigError, match=r"'data.batch_size_per_gpu': the pre-training data has 24 images, fewer "
                                          r"than one global batch \(32 per GPU x 1 processes\)"):
        run_pretraining(cfg)


def test_schedule_endpoints():
    cfg = _load(RECIPES / "pass_vit_s_lup.yaml", "data.root=/data/lup")
    iters_per_epoch, warmup = 50, 10 * 50
    schedules = build_schedules(cfg, iters_per_epoch=iters_per_epoch, world_size=8)
    assert len(schedules) == 100 * iters_per_epoch
    assert schedules.lr[0] == 0.0
    assert schedules.lr[warmup - 1] == pytest.approx(2e-3)  # end of the linear warm-up: the peak
    assert schedules.lr[warmup] == pytest.approx(2e-3)
    assert np.all(np.diff(schedules.lr[:warmup]) > 0) and np.all(np.diff(schedules.lr[warmup:]) < 0)
    assert schedules.lr[-1] == pytest.approx(1e-6, abs=1e-8)
    assert schedules.weight_decay[0] == pytest.approx(0.04) and schedules.weight_decay[-1] == pytest.approx(0.4, abs=1e-6)
    assert schedules.momentum[0] == pytest.approx(0.996) and schedules.momentum[-1] == pytest.approx(1.0, abs=1e-8)
    vit_b = build_schedules(_load(RECIPES / "pass_vit_b_lup.yaml", "data.root=/x"), iters_per_epoch, world_size=8)
    assert vit_b.lr.max() == pytest.approx(1e-3)


# ----------------------------------------------------------------------------- data pipeline


def test_multicrop_dataset_is_seeded_per_sample_and_skips_corrupt_files(synthetic_world, tmp_path):
    images = sorted((synthetic_world / "pool").rglob("*.jpg"))[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:200])  # truncated JPEG
    items = [ImageItem(str(path), -1, -1) for path in (images[0], broken, images[1])]
    augment = MultiCropAugmentation(global_size=(64, 32), local_size=(32, 16))
    dataset = MultiCropDataset(items, augment, seed=7, skip_corrupt=True)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = dataset[0]
    assert torch.equal(torch.get_rng_state(), before), "augmenting must not move the caller's RNG"
    torch.manual_seed(999)
    again = dataset[0]
    assert all(torch.equal(a, b) for a, b in zip(first["views"], again["views"])), "views depend only on (seed, epoch, index)"
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["views"][0], first["views"][0]), "another epoch draws other crops"

    replaced = dataset[1]
    assert replaced["skipped"] == 1 and dataset.reader.skipped_paths == [str(broken)]
    batch = collate_views([dataset[0], replaced])
    assert [tuple(v.shape) for v in batch["views"]] == [(2, 3, 64, 32)] * 2 + [(2, 3, 32, 16)] * 9
    assert batch["skipped"] == 1

    strict = MultiCropDataset(items, augment, seed=7, skip_corrupt=False)
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        strict[1]


# ----------------------------------------------------------------------------- 1. learning (the demo recipe)


def _run_train_script(argv: list[str]) -> str:
    """``pretrain/train.py`` in this process, through its command-line ``main``; what it printed."""
    spec = importlib.util.spec_from_file_location("pretrain_train_script", REPO_ROOT / "pretrain" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert module.main(argv) == 0
    return printed.getvalue()


# The demo recipe as published in configs/ (8 epochs of 12 iterations), without DataLoader workers.
DEMO_TEST_OVERRIDES = ["data.num_workers=0"]


@pytest.fixture(scope="module")
def demo_run(synthetic_world, monitor_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain_demo")
    printed = _run_train_script(["--config-file", str(DEMO), "--output-dir", str(out),
                                 "--data-root", str(synthetic_world / "pool"),
                                 f"monitor.root={monitor_world / 'pool'}", *DEMO_TEST_OVERRIDES])
    # the command's last word: how the run ended and where its outputs are (8 epochs x 12 iterations)
    assert f"pre-training finished at iteration 96; outputs in {out}" in printed
    return out


@pytest.mark.slow
def test_demo_recipe_learns_without_collapse(demo_run):
    cfg = _load(demo_run / "config.yaml")
    knn = [record for _, record in sorted(_train_records(demo_run, "knn").items())]
    assert [record["epoch"] for record in knn] == list(range(0, cfg.train.epochs + 1, cfg.monitor.period))
    initial, final = knn[0]["mAP"], knn[-1]["mAP"]
    print(f"demo kNN mAP (%) {[round(100 * r['mAP'], 2) for r in knn]}, rank-1 {[round(100 * r['rank1'], 1) for r in knn]}")
    assert final > initial + 0.03, f"kNN mAP did not rise clearly: {initial:.4f} -> {final:.4f}"

    train = _train_records(demo_run)
    log_k = math.log(cfg.model.out_dim)
    for step in sorted(train)[len(train) // 2:]:  # the second half of training
        record = train[step]
        for token in ("cls", "pt1", "pt2", "pt3"):
            per_image, batch_mean = record[f"teacher_entropy_{token}"], record[f"teacher_batch_entropy_{token}"]
            # H(batch mean) - mean H(per image) is the information the teacher's output carries about
            # the image: ~0 under both collapses (uniform: both ~ ln K; one-hot: both ~ 0).
            assert batch_mean - per_image > 0.2, f"step {step} {token}: collapsed ({per_image:.2f}, {batch_mean:.2f})"
            assert 1.0 < per_image < log_k - 0.3, f"step {step} {token}: per-image entropy {per_image:.2f}"
    assert all(math.isfinite(record["loss"]) and record["images_per_s"] > 0 for record in train.values())


@pytest.mark.slow
def test_demo_outputs_and_backbone_export(demo_run):
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "checkpoint.pth", "backbone.pth", "backbone_final.pth"):
        assert (demo_run / name).is_file(), name
    assert any((demo_run / "tb").iterdir())
    cfg = _load(demo_run / "config.yaml")
    checkpoint = torch.load(demo_run / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == cfg.train.epochs and checkpoint["iteration"] > 0

    fresh = build_vit(cfg.model.arch, img_size=tuple(cfg.model.img_size))
    report = load_pretrained(fresh, demo_run / "backbone_final.pth")
    assert report.is_exact and not (report.missing or report.unexpected or report.shape_mismatched)
    for key, value in fresh.state_dict().items():  # the teacher, part tokens included
        assert torch.equal(value, checkpoint["model"][f"teacher.backbone.{key}"]), key
    assert any(key.startswith("part_token") for key in fresh.state_dict())

    # The checkpoint also carries the published layout, so it loads directly as well.
    from_checkpoint = build_vit(cfg.model.arch, img_size=tuple(cfg.model.img_size))
    assert load_pretrained(from_checkpoint, demo_run / "checkpoint.pth", weights_only=False).is_exact


# ----------------------------------------------------------------------------- 2. exact resume


@pytest.mark.slow
@pytest.mark.parametrize("stop_by", ["max_iters", "signal"])
def test_resume_after_preemption_continues_exactly(synthetic_world, tmp_path, monkeypatch, stop_by):
    listing = _pool_file_list(synthetic_world, tmp_path, count=24)
    common = [*TINY, "data.dataset=image_folder", f"data.root={synthetic_world / 'pool'}", f"data.file_list={listing}",
              "data.batch_size_per_gpu=8", "data.num_workers=0", "train.epochs=2", "optim.warmup_epochs=1",
              "optim.lr=5e-3", "model.drop_path_rate=0.1"]  # 3 iterations / epoch; drop-path draws random numbers
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_pretraining(_load(None, *common, f"train.output_dir={straight}"))

    if stop_by == "signal":  # SLURM's SIGUSR1 arrives during iteration 4
        original_step = PretrainTrainer._step

        def step_then_signal(self, batch):
            result = original_step(self, batch)
            if self.iteration + 1 == 4:  # the loop counts the step after _step returns
                os.kill(os.getpid(), signal.SIGUSR1)
            return result

        monkeypatch.setattr(PretrainTrainer, "_step", step_then_signal)
        stopped = run_pretraining(_load(None, *common, f"train.output_dir={interrupted}"))
        assert stopped.preempted
        monkeypatch.setattr(PretrainTrainer, "_step", original_step)
    else:
        stopped = run_pretraining(_load(None, *common, f"train.output_dir={interrupted}", "train.max_iters=4"))
    assert (stopped.iteration, stopped.finished) == (4, False)  # mid-epoch 2: only checkpoint.pth is on disk
    assert not (interrupted / "backbone_final.pth").exists()
    resumed = run_pretraining(_load(None, *common, f"train.output_dir={interrupted}"))
    assert (resumed.iteration, resumed.finished) == (6, True)

    reference, continued = _train_records(straight), _train_records(interrupted)
    # schedules.npz keeps the per-iteration lr / wd / momentum the run stepped with (as logged).
    schedules = np.load(straight / "schedules.npz")
    assert [reference[step]["lr"] for step in range(1, 7)] == list(schedules["lr"])
    assert [reference[step]["momentum"] for step in range(1, 7)] == list(schedules["momentum"])
    assert sorted(reference) == sorted(continued) == list(range(1, 7))  # step = optimizer steps done
    assert [continued[step]["epoch"] for step in range(1, 7)] == [1, 1, 1, 2, 2, 2]  # epochs from 1, as in the log
    log = (interrupted / "log.txt").read_text()
    reason = "a pre-emption signal" if stop_by == "signal" else "train.max_iters"
    assert f"stopped at iteration 4 ({reason}) in epoch 2; checkpoint saved" in log
    assert f"resumed from {interrupted / 'checkpoint.pth'} at iteration 4, in epoch 2" in log
    losses = {step: (reference[step]["loss"], continued[step]["loss"]) for step in range(1, 7)}
    print("losses (uninterrupted, interrupted+resumed):", losses)
    for step in range(5, 7):  # the two steps after the resume at iteration 4
        assert continued[step]["loss"] == reference[step]["loss"], f"step {step} differs after resume"
    final_a = torch.load(straight / "backbone_final.pth", weights_only=True)["backbone"]
    final_b = torch.load(interrupted / "backbone_final.pth", weights_only=True)["backbone"]
    assert all(torch.equal(final_a[key], final_b[key]) for key in final_a)


def _two_steps_on_the_pool(synthetic_world: Path, tmp_path: Path, drop_path_rate: float) -> list[str]:
    """Overrides of a two-step tiny run on 8 pool images (one epoch of two batches of 4, no warm-up)."""
    listing = _pool_file_list(synthetic_world, tmp_path, count=8)
    return [*TINY, "data.dataset=image_folder", f"data.root={synthetic_world / 'pool'}", f"data.file_list={listing}",
            "data.batch_size_per_gpu=4", "data.num_workers=0", "train.epochs=1", "optim.warmup_epochs=0",
            f"model.drop_path_rate={drop_path_rate}"]


def test_train_compile_trains_what_the_eager_run_trains(synthetic_world, tmp_path, monkeypatch):
    """train.compile: the trainer compiles both backbones before its first step, and the run's losses are the
    eager run's. The compiler is AOT autograd's capture run by the aot_eager backend (what inductor compiles
    from, without its code generation, which takes minutes on two cores); inductor itself is timed on a GPU
    by bench/gpu_check.py's optional parts."""
    # drop path on: it draws random numbers inside the compiled graphs
    common = _two_steps_on_the_pool(synthetic_world, tmp_path, drop_path_rate=0.1)
    compiled_modes = []
    original = PASSMetaArch.compile_backbones

    def on_aot_eager(self, mode="default", backend="inductor"):
        compiled_modes.append(mode)
        original(self, mode, backend="aot_eager")

    monkeypatch.setattr(PASSMetaArch, "compile_backbones", on_aot_eager)
    eager = run_pretraining(_load(None, *common, f"train.output_dir={tmp_path / 'eager'}"))
    assert compiled_modes == []  # train.compile defaults to none: the published eager step
    compiled = run_pretraining(_load(None, *common, "train.compile=default", f"train.output_dir={tmp_path / 'c'}"))
    assert compiled_modes == ["default"] and eager.iteration == compiled.iteration == 2
    assert "student and teacher backbones: torch.compile mode default" in (tmp_path / "c" / "log.txt").read_text()
    reference, result = _train_records(tmp_path / "eager"), _train_records(tmp_path / "c")
    for step in (1, 2):
        # float32 on the CPU; AOT autograd's graphs may reorder float arithmetic, hence a tolerance of
        # float32 rounding accumulated over a tiny ViT and two steps, not equality
        assert result[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5)


def test_batch_band_views_trains_what_the_per_band_run_trains(synthetic_world, tmp_path, monkeypatch):
    """train.batch_band_views: the student's band views go through one backbone pass per step, and without drop
    path (whose masks a seed draws differently for one pass than for three) the run's losses are the per-band
    run's."""
    common = _two_steps_on_the_pool(synthetic_world, tmp_path, drop_path_rate=0.0)
    batched_calls = []
    original = MultiCropNetwork._band_batched_tokens

    def counted(self, groups):
        batched_calls.append(len(groups))
        return original(self, groups)

    monkeypatch.setattr(MultiCropNetwork, "_band_batched_tokens", counted)
    per_band = run_pretraining(_load(None, *common, f"train.output_dir={tmp_path / 'per_band'}"))
    assert batched_calls == []  # false by default: one pass per band, as published
    batched = run_pretraining(_load(None, *common, "train.batch_band_views=true", f"train.output_dir={tmp_path / 'b'}"))
    assert per_band.iteration == batched.iteration == 2 and batched_calls == [4, 4]  # globals + 3 bands per step
    assert "band views of all bands in one backbone pass" in (tmp_path / "b" / "log.txt").read_text()
    reference, result = _train_records(tmp_path / "per_band"), _train_records(tmp_path / "b")
    for step in (1, 2):
        # float32 on the CPU: matmuls over other row counts round differently; a tiny ViT, two steps
        assert result[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5)


def test_dino_mode_trains_and_exports_a_backbone_without_part_tokens(synthetic_world, tmp_path):
    listing = _pool_file_list(synthetic_world, tmp_path, count=8)
    out = tmp_path / "dino"
    result = run_pretraining(_load(
        RECIPES / "dino_vit_s_lup.yaml", *TINY, "data.dataset=image_folder", f"data.root={synthetic_world / 'pool'}",
        f"data.file_list={listing}", "data.batch_size_per_gpu=4", "data.num_workers=0", "train.epochs=1",
        "optim.warmup_epochs=0", f"train.output_dir={out}"))
    assert result.finished and result.iteration == 2
    records = _train_records(out)
    assert records[1]["num_terms"] == 2 * 9  # DINO: 2 teacher globals x (10 student views - 1)
    assert "teacher_entropy_pt1" not in records[1]
    export = torch.load(out / "backbone_final.pth", weights_only=True)
    assert export["num_part_tokens"] == 0 and export["mode"] == "dino"
    assert load_pretrained(build_vit("vit_tiny", img_size=(64, 32), num_part_tokens=0), export).is_exact


def test_the_lmdb_release_trains_as_the_same_images_in_a_folder(synthetic_world, tmp_path):
    # LUPerson's LMDB release (key -> JPEG bytes as a uint8 array, keys.pkl) holding the folder's images in the
    # folder's order: the same views (seeded per index), so the same losses; read by 2 forked workers, which
    # open the database themselves.
    lmdb = pytest.importorskip("lmdb")
    pool = synthetic_world / "pool"
    listing = _pool_file_list(synthetic_world, tmp_path, count=8)
    keys = listing.read_text().split()
    (tmp_path / "release").mkdir()
    env = lmdb.open(str(tmp_path / "release" / "lmdb"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key in keys:
            txn.put(key.encode(), np.frombuffer((pool / key).read_bytes(), np.uint8))
    env.close()
    (tmp_path / "release" / "keys.pkl").write_bytes(pickle.dumps(keys))
    common = [*TINY, "data.batch_size_per_gpu=4", "train.epochs=1", "optim.warmup_epochs=0"]
    folder = run_pretraining(_load(DEMO, *common, "data.dataset=image_folder", f"data.root={pool}",
                                   f"data.file_list={listing}", "data.num_workers=0",
                                   f"train.output_dir={tmp_path / 'folder'}"))
    release = run_pretraining(_load(DEMO, *common, "data.dataset=luperson_lmdb",
                                    f"data.root={tmp_path / 'release'}", "data.num_workers=2",
                                    f"train.output_dir={tmp_path / 'lmdb'}"))
    assert folder.finished and release.finished and release.iteration == folder.iteration == 2
    losses = [[_train_records(tmp_path / run)[step]["loss"] for step in (1, 2)] for run in ("folder", "lmdb")]
    # Same images, views and arithmetic in one process and thread: equal up to float rounding at most.
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


# ----------------------------------------------------------------------------- 3. DDP (2 processes, gloo)

DDP_GLOBAL_BATCH = 8
DDP_STEPS = 2


class FixedBatches:
    """A batch source of the same pre-made view batches every epoch: identical inputs whatever the process count."""

    def __init__(self, batches: list[list[torch.Tensor]]) -> None:
        self._batches = batches
        self.iters_per_epoch = len(batches)

    def batches(self, epoch: int, start: int):
        for views in self._batches[start:]:
            yield {"views": views, "skipped": 0}


def _fixed_global_batches() -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(2024)
    batches = []
    for _ in range(DDP_STEPS):
        views = [torch.randn(DDP_GLOBAL_BATCH, 3, 64, 32, generator=generator) for _ in range(2)]
        views += [torch.randn(DDP_GLOBAL_BATCH, 3, 32, 16, generator=generator) for _ in range(9)]
        batches.append(views)
    return batches


def _ddp_config(output_dir: Path, batch_per_process: int) -> PretrainConfig:
    # No drop-path: its per-sample masks would differ between the 1- and 2-process runs.
    # data.root is not read: the batches come from the batch source.
    return _load(None, *TINY, f"data.root={output_dir}", f"data.batch_size_per_gpu={batch_per_process}",
                 "train.epochs=1", "optim.warmup_epochs=0", "optim.freeze_last_layer=0", "model.drop_path_rate=0",
                 f"train.output_dir={output_dir}")


def _ddp_worker(rank: int, world_size: int, port: int, output_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from passreid import dist

    dist.init_distributed(backend="gloo", timeout=datetime.timedelta(seconds=120))
    share = DDP_GLOBAL_BATCH // world_size
    shard = [[view[rank * share:(rank + 1) * share] for view in views] for views in _fixed_global_batches()]
    leave_group_after(lambda: run_pretraining(_ddp_config(Path(output_dir), share), batch_source=FixedBatches(shard)))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_matches_one_process_on_the_same_global_batch(tmp_path):
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    context = start_workers(_ddp_worker, (2, free_port(), str(ddp_dir)))
    run_pretraining(_ddp_config(single_dir, DDP_GLOBAL_BATCH), batch_source=FixedBatches(_fixed_global_batches()))
    wait_for_workers(context, 300, "2-process pre-training")

    single, ddp = _train_records(single_dir), _train_records(ddp_dir)
    for step in range(1, DDP_STEPS + 1):  # the loss is averaged over ranks: the same global mean
        assert ddp[step]["loss"] == pytest.approx(single[step]["loss"], abs=1e-5)
    assert ddp[1]["lr"] == single[1]["lr"]  # global-batch lr scaling: 4 x 2 processes = 8 x 1

    seed_everything(0)  # the stage builds its model right after seed_everything(train.seed)
    cfg = _ddp_config(single_dir, DDP_GLOBAL_BATCH)
    initial = PASSMetaArch(cfg.model.arch, tuple(cfg.model.img_size), out_dim=cfg.model.out_dim,
                           hidden_dim=cfg.model.hidden_dim, bottleneck_dim=cfg.model.bottleneck_dim).state_dict()
    state_single = torch.load(single_dir / "checkpoint.pth", weights_only=False)["model"]
    state_ddp = torch.load(ddp_dir / "checkpoint.pth", weights_only=False)["model"]
    assert state_single.keys() == state_ddp.keys() == initial.keys()
    for prefix in ("student.", "teacher."):
        keys = [k for k in initial if k.startswith(prefix)]
        update_single = torch.cat([(state_single[k] - initial[k]).flatten() for k in keys])
        update_ddp = torch.cat([(state_ddp[k] - initial[k]).flatten() for k in keys])
        assert update_single.abs().sum() > 0
        relative = (update_ddp - update_single).abs().sum() / update_single.abs().sum()
        print(f"{prefix} update after {DDP_STEPS} steps: 2 processes vs 1 differ by {relative:.2e} (relative L1); "
              f"losses {[single[k]['loss'] for k in sorted(single)]} vs {[ddp[k]['loss'] for k in sorted(ddp)]}")
        assert relative < 1e-3, f"{prefix} update differs by {relative:.2e} (relative L1)"
    for key in (k for k in initial if k.startswith("loss.center")):
        torch.testing.assert_close(state_ddp[key], state_single[key], rtol=1e-4, atol=1e-6)
