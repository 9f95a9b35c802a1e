"""Every recipe of a published row runs as published: its training and evaluation precision, and weights that
must be named (no silent random initialisation). Recipe-specific values are checked next to each method."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from passreid.config import ConfigError, load_config
from passreid.engine import autocast_for, resolve_precision, run_precision
from passreid.eval import evaluator as finetune_evaluator
from passreid.finetune import FinetuneConfig, run_training
from passreid.pretrain import PretrainConfig
from passreid.models.factory import build_backbone, load_backbone_weights
from passreid.usl import UslConfig, run_usl

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FINETUNE_RECIPES = sorted(p for p in (CONFIGS / "finetune").rglob("*.yaml")
                          if "_base_" not in p.parts and p.parent != CONFIGS / "finetune")  # not the demos
CLUSTER_RECIPES = sorted(p for stage in ("usl", "uda") for p in (CONFIGS / stage).glob("*.yaml")
                         if not p.name.startswith("demo"))
PRETRAIN_RECIPES = sorted((CONFIGS / "pretrain").glob("*_lup.yaml"))

# What the published training loops run; every one of them extracts test features outside autocast (fp32).
#   fp16 autocast + GradScaler: PASS-reID PASS_transreid/processor/processor.py, and the same loop in TransReID,
#   TransReID-SSL, DPM and TSD (processor/processor_tsd.py); PASS/main_pass.py and TransReID-SSL
#   dino/main_dino.py (--use_fp16, default True).
#   fp32: bpbreid (torchreid engine, no autocast), DPEFormer (processor/processor.py makes a GradScaler and
#   never uses it), PASS_cluster_contrast_reid (USL and UDA).
FINETUNE_TRAIN_PRECISION = {"bnneck": "fp16", "dpm": "fp16", "tsd": "fp16", "bpbreid": "fp32", "dpeformer": "fp32"}


def _rel(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


@pytest.fixture
def bf16_gpu(monkeypatch):
    """An A100/H100-like CUDA device for the selection logic (no GPU needed: nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


def _published_precision(path: Path) -> tuple[str, str, str | None]:
    """(train, eval) precision of a recipe as published (eval None: the stage has no evaluation), and its
    (train, eval) config values."""
    if path.parent.name == "pretrain":
        cfg = load_config(PretrainConfig, path)
        return "fp16", cfg.train.precision, None
    if path.parent.name in ("usl", "uda"):
        cfg = load_config(UslConfig, path)
        return "fp32", cfg.train.precision, cfg.eval.precision
    cfg = load_config(FinetuneConfig, path)
    return FINETUNE_TRAIN_PRECISION[cfg.method], cfg.train.precision, cfg.eval.precision


@pytest.mark.parametrize("path", FINETUNE_RECIPES + CLUSTER_RECIPES + PRETRAIN_RECIPES, ids=_rel)
def test_published_recipes_pin_the_published_precision(path: Path, bf16_gpu):
    expected_train, train, evaluation = _published_precision(path)
    # On a bf16-capable GPU 'auto' would give bf16 without a scaler: the recipes must not leave it to 'auto'.
    resolved = run_precision("cuda", train, evaluation or "fp32")
    assert (resolved.train, resolved.eval) == (expected_train, "fp32")
    assert evaluation in (None, "fp32")
    scaler = autocast_for("cuda", resolved.train).scaler
    assert isinstance(scaler, torch.amp.GradScaler) if expected_train == "fp16" else scaler is None


def test_precision_selection_on_cuda_and_cpu(monkeypatch, bf16_gpu):
    # fp16 always trains with a GradScaler; auto is bf16 (no scaler) where bf16 runs, fp16 + scaler elsewhere.
    assert resolve_precision("cuda", "fp16") == "fp16"
    assert isinstance(autocast_for("cuda", "fp16").scaler, torch.amp.GradScaler)
    assert resolve_precision("cuda", "auto") == "bf16" and autocast_for("cuda", "auto").scaler is None
    described = run_precision("cuda", "fp16", "fp32").describe()
    assert described == "train fp16 autocast + GradScaler, eval fp32 (no autocast)"
    assert run_precision("cuda", "auto", "fp32").describe().startswith("train bf16 autocast (from auto)")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # a V100
    assert resolve_precision("cuda", "auto") == "fp16" and autocast_for("cuda", "auto").scaler is not None
    with pytest.raises(ConfigError, match="'eval.precision': 'bf16' requested but this GPU does not support"):
        run_precision("cuda", "fp16", "bf16")
    with pytest.raises(ConfigError, match="'train.precision': 'fp16' needs a CUDA device.*train.precision=fp32"):
        run_precision("cpu", "fp16", "fp32")


def test_a_published_recipe_on_cpu_names_the_precision_key(tmp_path: Path):
    cfg = load_config(FinetuneConfig, CONFIGS / "finetune" / "market1501" / "pass_vit_s_256.yaml",
                      [f"train.output_dir={tmp_path}", "train.device=cpu"])
    with pytest.raises(ConfigError, match="train.precision"):
        run_training(cfg, resume=False)


def _record_autocast_in_feature_extraction(monkeypatch) -> list[bool]:
    """Whether CPU autocast was on in each eval-mode feature forward (test and clustering features)."""
    states: list[bool] = []
    original = finetune_evaluator.extract_features

    def recording(model, loader, *, feature_fn, **kwargs):
        def feature(m, images):
            states.append(torch.is_autocast_enabled("cpu"))
            return feature_fn(m, images)
        return original(model, loader, feature_fn=feature, **kwargs)

    monkeypatch.setattr(finetune_evaluator, "extract_features", recording)
    return states


@pytest.mark.parametrize("eval_precision, autocast_on", [("fp32", False), ("bf16", True)])
def test_finetune_evaluates_in_eval_precision_not_under_the_training_autocast(
        tmp_path: Path, synthetic_world: Path, monkeypatch, eval_precision: str, autocast_on: bool):
    states = _record_autocast_in_feature_extraction(monkeypatch)
    out = tmp_path / "run"
    cfg = load_config(FinetuneConfig, CONFIGS / "finetune" / "demo.yaml", [
        f"train.output_dir={out}", f"data.root={synthetic_world}/market", "model.img_size=[64,32]",
        "data.test_batch_size=256", "train.max_iters=1", "train.precision=bf16", f"eval.precision={eval_precision}"])
    run_training(cfg, resume=False)
    assert states and set(states) == {autocast_on}
    ran = f"train bf16 autocast, eval {'fp32 (no autocast)' if eval_precision == 'fp32' else 'bf16 autocast'}"
    assert (out / "config.yaml").read_text().startswith(f"# precision that ran on cpu: {ran}\n")
    assert f"precision on cpu: {ran}" in (out / "log.txt").read_text()
    assert load_config(FinetuneConfig, out / "config.yaml").eval.precision == eval_precision


@pytest.mark.slow
def test_cluster_contrast_clusters_and_evaluates_in_eval_precision(tmp_path: Path, synthetic_world: Path,
                                                                   monkeypatch):
    states = _record_autocast_in_feature_extraction(monkeypatch)
    cfg = load_config(UslConfig, CONFIGS / "usl" / "demo.yaml", [
        f"train.output_dir={tmp_path}", f"data.root={synthetic_world}/market",
        "model.pretrained=none", "model.img_size=[64,32]", "data.batch_size=16", "data.test_batch_size=256",
        "cluster.k1=10", "cluster.k2=3", "cluster.eps=0.7", "train.epochs=1", "train.iters=1",
        "train.eval_at_start=false", "train.precision=bf16", "eval.precision=fp32"])
    run_usl(cfg, resume=False)
    assert len(states) >= 2 and not any(states)  # the clustering features and the test features


# ------------------------------------------------------------------ weights are never random by accident


def _tiny_backbone(cfg: FinetuneConfig | UslConfig) -> torch.nn.Module:
    cfg.model.arch, cfg.model.img_size = "vit_tiny", (64, 32)
    return build_backbone(cfg.model)


@pytest.mark.parametrize("path", FINETUNE_RECIPES + [p for p in CLUSTER_RECIPES if p.parent.name == "usl"], ids=_rel)
def test_a_recipe_without_weights_is_an_error_naming_the_key(path: Path):
    cfg = load_config(UslConfig if path.parent.name == "usl" else FinetuneConfig, path)
    assert cfg.model.pretrained == ""  # the recipes leave the file to the user
    with pytest.raises(ConfigError, match=r"config key 'model.pretrained': is empty.*model.pretrained=none"):
        load_backbone_weights(_tiny_backbone(cfg), cfg.model)


def test_pretrained_none_is_random_init_with_one_warning(caplog):
    cfg = load_config(FinetuneConfig, None, ["model.pretrained=none"])
    backbone = _tiny_backbone(cfg)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        assert load_backbone_weights(backbone, cfg.model) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "RANDOM initialisation (model.pretrained=none)" in warnings[0]
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


@pytest.mark.cuda
def test_fp16_training_step_with_scaler_and_fp32_evaluation_on_a_gpu():
    resolved = run_precision("cuda", "fp16", "fp32")
    train, evaluation = autocast_for("cuda", resolved.train), autocast_for("cuda", resolved.eval)
    assert isinstance(train.scaler, torch.amp.GradScaler) and train.scaler.is_enabled()
    layer = torch.nn.Linear(8, 8).cuda()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    with train.autocast():
        out = layer(torch.randn(4, 8, device="cuda"))
        assert out.dtype == torch.float16
        with evaluation.autocast():  # the eval precision switches an enclosing autocast off
            assert layer(torch.randn(4, 8, device="cuda")).dtype == torch.float32
    train.scaler.scale(out.float().pow(2).mean()).backward()
    train.scaler.step(optimizer)
    train.scaler.update()
    assert train.scaler.get_scale() > 0 and all(torch.isfinite(p).all() for p in layer.parameters())
