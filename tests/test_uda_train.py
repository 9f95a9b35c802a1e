"""UDA start: a source fine-tuned model's backbone is loaded exactly, its heads are dropped and reported, the
adaptation runs on another generated world, and uda/train.py insists on a source model."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from _inference_models import save_published_pass_checkpoint, tiny_pass_vit
from passreid.config import ConfigError, load_config
from passreid.finetune import FinetuneConfig, run_training
from passreid.models import CheckpointFormatError
from passreid.uda import build_uda_model, run_uda
from passreid.usl import UslConfig, run_usl

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.img_size=[64,32]", "model.drop_path_rate=0.0", "data.batch_size=16", "data.test_batch_size=64"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def source_model(tmp_path_factory, synthetic_world: Path) -> Path:
    """A (barely) trained fine-tuning demo model on the default world: 2 iterations."""
    out = tmp_path_factory.mktemp("source")
    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo.yaml",
                      [f"train.output_dir={out}", f"data.root={synthetic_world}/market", *SMALL, "train.max_iters=2",
                       "eval.period=100"])
    return run_training(cfg, resume=False).final_model


@pytest.fixture(scope="module")
def target_root(uda_world: Path) -> Path:
    return uda_world / "market"


def _uda_config(out: Path, source: Path, target: Path, *extra: str) -> UslConfig:
    return load_config(UslConfig, REPO / "configs" / "uda" / "demo.yaml",
                       [f"train.output_dir={out}", f"data.root={target}", f"model.init_from={source}", *SMALL, *extra])


def test_source_backbone_loaded_exactly_and_heads_dropped(tmp_path: Path, source_model: Path, target_root: Path,
                                                         caplog):
    cfg = _uda_config(tmp_path, source_model, target_root)
    with caplog.at_level(logging.INFO, logger="passreid.models.checkpoint"):
        model, source = build_uda_model(cfg.model, cfg.model.init_from)
    # The backbone load report (logged and kept) names the source file.
    assert f"from {source_model}" in caplog.text and "<in-memory checkpoint>" not in caplog.text
    assert source.backbone.source == str(source_model)
    stored = torch.load(source_model, weights_only=False)["model"]
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, stored[f"backbone.{key}"]), key
    assert source.backbone.is_exact and source.source_classes == 24
    assert source.dropped == sorted(k for k in stored if not k.startswith("backbone."))
    assert "head.classifier.weight" in source.dropped and "head.necks.0.running_mean" in source.dropped
    for neck in model.head.necks:  # fresh necks: weight 1, bias 0, fresh statistics
        assert torch.equal(neck.weight, torch.ones_like(neck.weight))
        assert torch.equal(neck.running_var, torch.ones_like(neck.running_var))
    assert model.head.classifier is None
    necks = sum(key.startswith("head.necks.") for key in source.dropped)
    assert (f"source heads dropped (24 source classes): head.classifier.weight, head.necks.* ({necks})"
            in source.summary())


def test_usl_refuses_a_source_model_and_names_the_uda_stage(tmp_path: Path):
    # USL starts from model.pretrained; a source-domain start is the UDA stage, never silently ignored.
    with pytest.raises(ConfigError, match="model.init_from.*UDA stage.*passreid-uda"):
        run_usl(_uda_config(tmp_path, tmp_path / "source.pth", tmp_path / "target"))
    assert not (tmp_path / "checkpoint.pth").exists()


@pytest.mark.slow
def test_adaptation_runs_on_the_target_world(tmp_path: Path, source_model: Path, target_root: Path):
    result = run_uda(_uda_config(tmp_path / "uda", source_model, target_root, "train.epochs=1", "train.iters=2",
                                 "train.eval_at_start=false", "cluster.eps=0.7"), resume=False)
    assert result.source is not None and result.source.source_classes == 24
    assert '"seed": 2' in (target_root.parent / "world.json").read_text()  # the target: other people and cameras
    assert f"root: {target_root}" in (tmp_path / "uda" / "config.yaml").read_text()
    assert result.history[0]["samples"] > 125 and result.final_model.is_file()


def test_source_backbone_from_a_released_pass_reid_checkpoint(tmp_path: Path, source_model: Path, target_root: Path):
    """A released PASS-reID / TransReID supervised state dict (``module.base.*``, ``bottleneck_k``, ``classifier``,
    the ViT's ImageNet ``base.fc``) starts UDA too: its backbone is loaded exactly, everything else is dropped."""
    stored = torch.load(source_model, weights_only=False)["model"]
    released = {}
    for key, value in stored.items():
        if key.startswith("backbone."):
            released["module.base." + key[len("backbone."):]] = value
        elif key.startswith("head.necks."):
            index, rest = key[len("head.necks."):].split(".", 1)
            released["module." + ("bottleneck" if index == "0" else f"bottleneck_{index}") + "." + rest] = value
        elif key.startswith("head.classifier."):
            released["module.classifier." + key[len("head.classifier."):]] = value
    released["module.base.fc.weight"] = torch.zeros(1000, stored["backbone.cls_token"].shape[-1])
    path = tmp_path / "transformer_120.pth"
    torch.save(released, path)
    cfg = _uda_config(tmp_path, path, target_root)
    model, source = build_uda_model(cfg.model, cfg.model.init_from)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, stored[f"backbone.{key}"]), key
    assert source.backbone.is_exact and source.source_classes == 24
    assert "head.classifier.weight" in source.dropped and "head.necks.0.running_mean" in source.dropped
    assert not any(key.startswith("backbone.") for key in source.dropped)
    assert any(key.startswith("base.fc.weight (") for key in source.dropped)  # dropped with its reason, listed


def test_a_pre_training_file_as_source_is_named_as_such(tmp_path: Path):
    checkpoint = save_published_pass_checkpoint(tmp_path / "pass.pth", tiny_pass_vit())
    cfg = _uda_config(tmp_path, checkpoint, tmp_path / "target")
    with pytest.raises(CheckpointFormatError, match="is a pre-training file .*model.init_from expects the model "
                                                    "fine-tuned on the source domain"):
        build_uda_model(cfg.model, cfg.model.init_from)


def test_uda_entry_point_requires_a_source_model(tmp_path: Path, capsys):
    from _tool_loading import load_tool_module

    uda_train = load_tool_module(REPO / "uda" / "train.py", "uda_train_entry")
    assert uda_train.main(["--config-file", str(REPO / "configs" / "uda" / "demo.yaml"),
                           "--output-dir", str(tmp_path)]) == 2
    assert "uda/train.py: error: config key 'model.init_from': UDA starts from a model trained on the source " \
           "domain" in capsys.readouterr().err
