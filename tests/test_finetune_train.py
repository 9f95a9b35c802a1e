"""End-to-end fine-tuning on the generated world: outputs, evaluation, resume, test.py, SIE + JPM."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from passreid.config import load_config
from passreid.engine import Checkpointer, CheckpointStateError, warmup_cosine_lr
from passreid.eval import rank_metrics
from passreid.finetune import FinetuneConfig, load_finetuned_model, run_training
from passreid.data.reid_sets import load_test_dataset
from passreid.finetune.optim import schedule_epoch

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "finetune" / "demo.yaml"
# Fast variant of the demo for the plumbing tests: 64x32 input, a few iterations.
FAST = ["model.img_size=[64,32]", "train.log_period=1", "data.test_batch_size=256"]
# The demo from random init ends near mAP 0.4 on the generated test split (README); random features score
# about 0.06 there. The bound leaves room for run-to-run differences between machines and torch builds.
DEMO_MIN_MAP = 0.25


def _cfg(output_dir: Path, world: Path, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, DEMO, [f"train.output_dir={output_dir}", f"data.root={world}/market",
                                              *FAST, *overrides])


def _records(output_dir: Path, split: str) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"finetune_{name}", REPO / "finetune" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, synthetic_world):
    """configs/finetune/demo.yaml as shipped (only the log period changed), on the default generated world."""
    out = tmp_path_factory.mktemp("finetune") / "demo"
    cfg = load_config(FinetuneConfig, DEMO, [f"train.output_dir={out}", f"data.root={synthetic_world}/market",
                                             "train.log_period=1"])
    return out, run_training(cfg, resume=False)


@pytest.mark.slow
def test_demo_reaches_a_map_far_above_random_features(demo_run):
    out, result = demo_run
    dataset = load_test_dataset(load_config(FinetuneConfig, out / "config.yaml").data)
    generator = np.random.default_rng(0)
    random_map = np.mean([
        rank_metrics(generator.normal(size=(len(dataset.query), 64)), generator.normal(size=(len(dataset.gallery), 64)),
                     [i.pid for i in dataset.query], [i.pid for i in dataset.gallery],
                     [i.camid for i in dataset.query], [i.camid for i in dataset.gallery]).mAP
        for _ in range(5)
    ])
    assert random_map < 0.1
    assert result.final_metrics["mAP"] >= DEMO_MIN_MAP, (result.final_metrics, random_map)
    assert result.final_metrics["mAP"] >= 3 * random_map
    evals = _records(out, "eval")
    assert evals[-1]["mAP"] > evals[0]["mAP"]  # it learns over the run, not only at the first evaluation


@pytest.mark.slow
def test_run_writes_the_standard_outputs(demo_run):
    out, result = demo_run
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "checkpoint.pth", "model_final.pth"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    train = _records(out, "train")
    assert [r["step"] for r in train] == list(range(1, result.iterations + 1))
    assert all(np.isfinite(r["loss"]) and 0.0 <= r["acc"] <= 1.0 for r in train)
    cfg = load_config(FinetuneConfig, out / "config.yaml")
    evals = _records(out, "eval")
    expected_epochs = list(range(cfg.eval.period, cfg.train.epochs + 1, cfg.eval.period))
    assert [r["epoch"] for r in evals] == expected_epochs  # every eval.period epochs, no duplicate at the end
    assert set(evals[-1]) >= {"rank1", "rank5", "rank10", "mAP", "mINP"}
    assert result.final_metrics == {k: evals[-1][k] for k in result.final_metrics}
    state = Checkpointer(out).load()
    assert state["epoch"] == cfg.train.epochs and state["iteration"] == result.iterations
    assert state["sampler"] == {"epoch": cfg.train.epochs, "position": 0}


@pytest.mark.slow
def test_learning_rate_follows_the_configured_stepping(demo_run):
    out, _ = demo_run
    cfg = load_config(FinetuneConfig, out / "config.yaml")
    for record in _records(out, "train"):
        t = schedule_epoch(record["epoch"] - 1, cfg.optim.lr_stepping)
        expected = warmup_cosine_lr(t, cfg.optim.lr, cfg.train.epochs, cfg.optim.warmup_epochs,
                                    cfg.optim.lr * cfg.optim.warmup_lr_factor, cfg.optim.lr * cfg.optim.min_lr_factor)
        assert record["lr"] == pytest.approx(expected, rel=1e-12)
    # schedules.npz holds the same curve for every param group, one row per iteration.
    schedules = np.load(out / "schedules.npz")
    train = _records(out, "train")
    assert schedules["lr"].shape[0] == len(train) and schedules["lr"].shape[1] >= 1
    assert [r["lr"] for r in train] == list(schedules["lr"][:, 0])
    assert [r["epoch"] for r in train] == list(schedules["epoch"])


@pytest.mark.slow
def test_test_script_rebuilds_the_model_and_writes_matching_metrics(demo_run, tmp_path):
    out, result = demo_run
    test_dir = tmp_path / "test"
    assert _load_script("test").main(["--weights", str(out / "model_final.pth"), "--output-dir", str(test_dir)]) == 0
    metrics = json.loads((test_dir / "metrics.json").read_text())
    # The model rebuilt from model_final.pth alone reproduces the trainer's final evaluation exactly.
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert metrics[key] == pytest.approx(result.final_metrics[key], abs=1e-9), key
    query, gallery = (np.load(test_dir / f"{split}_features.npz") for split in ("query", "gallery"))
    recomputed = rank_metrics(query["feats"], gallery["feats"], query["pids"], gallery["pids"],
                              query["camids"], gallery["camids"])
    assert recomputed.mAP == pytest.approx(metrics["mAP"], abs=1e-9)
    assert list(recomputed.cmc) == pytest.approx(metrics["plain"]["cmc"], abs=1e-12)
    model, cfg, _ = load_finetuned_model(out / "model_final.pth")
    assert query["feats"].shape == (metrics["plain"]["num_queries"], model.feature_dim)
    # The last training checkpoint rebuilds the same model (config and class / camera counts inside).
    from_checkpoint, _, _ = load_finetuned_model(out / "checkpoint.pth")
    final_state = model.state_dict()
    assert all(torch.equal(v, final_state[k]) for k, v in from_checkpoint.state_dict().items())


def test_resume_continues_with_the_same_losses(tmp_path, synthetic_world):
    """Stopped mid-epoch at iteration 4 (train.max_iters), resumed to 6: steps 5 and 6 equal an uninterrupted run."""
    common = ["train.epochs=4", "eval.period=100", "train.checkpoint_period=100"]
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    run_training(_cfg(reference_dir, synthetic_world, *common, "train.max_iters=6"), resume=False)
    first = run_training(_cfg(resumed_dir, synthetic_world, *common, "train.max_iters=4"), resume=False)
    state = Checkpointer(resumed_dir).load()
    assert first.iterations == 4 and state["iteration"] == 4 and state["sampler"]["position"] > 0
    # Negative control: --no-resume on that directory starts again from iteration 0.
    assert run_training(_cfg(tmp_path / "copy", synthetic_world, *common, "train.max_iters=1"), resume=False).iterations == 1
    run_training(_cfg(resumed_dir, synthetic_world, *common, "train.max_iters=6"), resume=True)

    expected = {r["step"]: r for r in _records(reference_dir, "train")}
    resumed = {r["step"]: r for r in _records(resumed_dir, "train")}
    assert sorted(expected) == sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        for key in ("loss", "id", "triplet", "lr"):
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-9), (step, key)
    # The run folder's per-iteration schedule is the rate each step ran at (train.max_iters=6: six rows).
    lr = np.load(resumed_dir / "schedules.npz")["lr"]
    assert lr.shape[0] == 6 and [resumed[step]["lr"] for step in range(1, 7)] == list(lr[:, 0])


def test_a_mid_epoch_checkpoint_of_another_process_count_is_refused(tmp_path, synthetic_world):
    """Each process's position in the epoch depends on their number: a checkpoint written mid-epoch by two
    processes (simulated: two stored RNG states) does not continue on one; at an epoch boundary it does."""
    common = ["train.epochs=2", "eval.period=100", "train.checkpoint_period=100"]
    run_training(_cfg(tmp_path, synthetic_world, *common, "train.max_iters=2"), resume=False)
    checkpointer = Checkpointer(tmp_path)
    state = checkpointer.load()
    assert state["sampler"]["position"] > 0 and len(state["rng"]) == 1
    checkpointer.save({**state, "rng": state["rng"] * 2})
    with pytest.raises(CheckpointStateError, match=r"middle of epoch 1 by 2 process\(es\).*this run has 1"):
        run_training(_cfg(tmp_path, synthetic_world, *common, "train.max_iters=3"), resume=True)
    checkpointer.save({**state, "rng": state["rng"] * 2, "sampler": {"epoch": 1, "position": 0}})
    assert run_training(_cfg(tmp_path, synthetic_world, *common, "train.max_iters=3"), resume=True).iterations == 3


def test_sie_and_jpm_train_and_evaluate_with_camera_ids(tmp_path, synthetic_world):
    cfg = _cfg(tmp_path, synthetic_world, "model.num_part_tokens=0", "model.head=cls", "model.sie_camera=true",
               "model.jpm=true", "model.jpm_shift=2", "train.max_iters=2", "eval.rerank=true")
    result = run_training(cfg, resume=False)
    assert {"mAP", "rerank_mAP", "rerank_rank1"} <= set(result.final_metrics)
    model, _, _ = load_finetuned_model(tmp_path / "model_final.pth")
    assert model.sie_embed.shape[0] == 4 and model.jpm is not None and model.feature_dim == 5 * 192
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert model(images, camids=torch.tensor([0, 3])).shape == (2, 5 * 192)


def test_sie_with_a_test_camera_it_has_no_embedding_for_is_refused_before_training(tmp_path, synthetic_world):
    import shutil

    from passreid.config import ConfigError
    from passreid.finetune.testing import run_test

    world = tmp_path / "world"
    shutil.copytree(synthetic_world / "market", world / "market")
    query = sorted((world / "market" / "query").glob("*.jpg"))[0]
    query.rename(query.with_name(re.sub(r"_c\d", "_c6", query.name)))  # a sixth camera; training has four
    cfg = _cfg(tmp_path / "run", world, "model.num_part_tokens=0", "model.head=cls", "model.sie_camera=true")
    with pytest.raises(ConfigError, match=r"'model.sie_camera': the test set market1501 .* camera ids \[5\]"):
        run_training(cfg, resume=False)
    assert not (tmp_path / "run" / "checkpoint.pth").exists()  # refused before the first step
    trained = _cfg(tmp_path / "trained", synthetic_world, "model.num_part_tokens=0", "model.head=cls",
                   "model.sie_camera=true", "train.max_iters=1", "eval.period=100")
    run_training(trained, resume=False)
    with pytest.raises(ConfigError, match=r"camera ids \[5\]"):  # test.py: the model's own camera count
        run_test(tmp_path / "trained" / "model_final.pth", _cfg(tmp_path / "t", world), tmp_path / "test")


def test_a_pretrain_backbone_export_initialises_the_demo_model(tmp_path, synthetic_world):
    """`model.pretrained` pointing at a pretrain/ backbone.pth export (vit_tiny, 3 part tokens) just works."""
    from passreid.engine import atomic_save
    from passreid.models import build_vit, export_backbone

    torch.manual_seed(3)
    backbone = build_vit("vit_tiny", img_size=(128, 64), pass_interp_quirk=True)
    export = atomic_save(export_backbone(backbone, "vit_tiny", epoch=100), tmp_path / "backbone.pth")
    cfg = load_config(FinetuneConfig, DEMO, [f"train.output_dir={tmp_path / 'run'}", f"data.root={synthetic_world}/market",
                                             f"model.pretrained={export}", "train.max_iters=1",
                                             "optim.lr=1e-12"])  # a negligible step: weights stay as loaded
    run_training(cfg, resume=False)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"Loaded {len(backbone.state_dict())} / {len(backbone.state_dict())} tensors from {export}" in log
    model, _, _ = load_finetuned_model(tmp_path / "run" / "model_final.pth")
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value, rtol=0, atol=1e-6)


def _test_metrics(weights: Path, output_dir: Path, *args: str) -> dict:
    assert _load_script("test").main(["--weights", str(weights), "--output-dir", str(output_dir), *args]) == 0
    return json.loads((output_dir / "metrics.json").read_text())


METRIC_KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def test_a_model_file_is_tested_as_trained_whatever_the_given_config(tmp_path, synthetic_world, capsys):
    """test.py --config-file <a DPM config> on a bnneck model_final.pth: the method, its test distance and the test
    transform are the file's (the given ones are named in a warning), the test set and eval.* the given config's."""
    run = tmp_path / "run"
    run_training(_cfg(run, synthetic_world, "train.max_iters=2", "eval.period=100"), resume=False)
    own = _test_metrics(run / "model_final.pth", tmp_path / "own")
    other = ["--config-file", str(REPO / "configs" / "finetune" / "demo_dpm.yaml"),
             "--data-root", f"{synthetic_world}/market", *FAST,
             "data.pixel_mean=[0.485,0.456,0.406]", "data.test_interpolation=bicubic"]
    given = _test_metrics(run / "model_final.pth", tmp_path / "given", *other)
    for key in METRIC_KEYS:
        assert given[key] == pytest.approx(own[key], abs=1e-9), key
    assert given["dataset_root"] == own["dataset_root"]
    log = (tmp_path / "given" / "log.txt").read_text()
    assert "method='dpm' (file: 'bnneck')" in log and "data.test_interpolation='bicubic' (file: 'bilinear')" in log
    capsys.readouterr()
    assert _load_script("test").main(["--weights", str(run / "model_final.pth"), *other, "--print-config"]) == 0
    text = capsys.readouterr().out  # --print-config shows the config the test runs with
    assert "method: bnneck" in text and "test_interpolation: bilinear" in text


def test_a_training_checkpoint_of_a_part_method_is_evaluated(tmp_path, synthetic_world):
    """A TSD run's checkpoint.pth (no ReIDModel key names) stores its class and camera counts: test.py evaluates it
    as the run's model_final.pth; a checkpoint without them (older passreid) falls back to the tensor shapes."""
    run = tmp_path / "tsd"
    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo_tsd.yaml",
                      [f"train.output_dir={run}", f"data.root={synthetic_world}/market_occluded", "train.max_iters=1",
                       "eval.period=100", "data.test_batch_size=256"])
    run_training(cfg, resume=False)
    state = Checkpointer(run).load()
    assert "head.classifier.weight" not in state["model"]
    assert (state["extra"]["num_classes"], state["extra"]["num_cameras"]) == (24, 4)
    from_checkpoint = _test_metrics(run / "checkpoint.pth", tmp_path / "checkpoint")
    final = _test_metrics(run / "model_final.pth", tmp_path / "final")
    for key in METRIC_KEYS:
        assert from_checkpoint[key] == pytest.approx(final[key], abs=1e-9), key

    bnneck = tmp_path / "bnneck"
    run_training(_cfg(bnneck, synthetic_world, "train.max_iters=1", "eval.period=100"), resume=False)
    old = Checkpointer(bnneck).load()
    for key in ("num_classes", "num_cameras"):
        del old["extra"][key]
    torch.save(old, tmp_path / "old_checkpoint.pth")
    model, _, _ = load_finetuned_model(tmp_path / "old_checkpoint.pth")
    assert model.head.classifier.weight.shape[0] == 24
