"""Model files for the inference / tools tests: a briefly trained demo model, untrained fine-tuned models,
backbone exports and checkpoints in the published layouts."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from passreid.config import load_config
from passreid.finetune import FinetuneConfig, build_final_checkpoint, build_model, run_training
from passreid.models import build_vit, export_backbone

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "finetune" / "demo.yaml"


def demo_config(output_dir: Path, world: Path, *overrides: str) -> FinetuneConfig:
    """configs/finetune/demo.yaml on the test session's generated world."""
    return load_config(FinetuneConfig, DEMO, [f"train.output_dir={output_dir}", f"data.world_dir={world}", *overrides])


def train_demo_model(output_dir: Path, world: Path, iterations: int = 6) -> tuple[Path, FinetuneConfig]:
    """The demo recipe for a few iterations (evaluated once, at the end); returns model_final.pth and its config."""
    cfg = demo_config(output_dir, world, f"train.max_iters={iterations}", "eval.period=1000", "train.log_period=1")
    result = run_training(cfg, resume=False)
    return Path(result.final_model), cfg


def untrained_final_model(path: Path, cfg: FinetuneConfig, num_classes: int = 5, num_cameras: int = 0) -> Path:
    """A model_final.pth of a freshly built (random) model of ``cfg``."""
    torch.manual_seed(0)
    model = build_model(cfg, num_classes, num_cameras, load_weights=False)
    torch.save(build_final_checkpoint(model, cfg, num_classes, num_cameras), path)
    return path


def tiny_pass_vit(seed: int = 0, num_part_tokens: int = 3):
    """vit_tiny 128x64 with PASS part tokens (the pretrain demo's backbone), random weights."""
    torch.manual_seed(seed)
    return build_vit("vit_tiny", img_size=(128, 64), patch_size=16, stride_size=16,
                     num_part_tokens=num_part_tokens).eval()


def save_backbone_export(path: Path, vit) -> Path:
    torch.save(export_backbone(vit, "vit_tiny"), path)
    return path


def save_published_pass_checkpoint(path: Path, vit) -> Path:
    """The published PASS pre-training checkpoint layout: teacher/student backbone + heads, args."""
    state = vit.state_dict()
    head = {"head.last_layer.weight": torch.zeros(4, 8)}
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, **head},
                "student": {**{f"module.backbone.{k}": v for k, v in state.items()},
                            **{f"module.{k}": v for k, v in head.items()}},
                "epoch": 3, "args": argparse.Namespace(arch="vit_tiny", height=128, width=64, patch_size=16)}, path)
    return path


def save_published_transreid_checkpoint(path: Path, model) -> Path:
    """A published TransReID fine-tuned state dict (``base.*`` with the timm [CLS] position slot, ``bottleneck``,
    ``classifier``) of a passreid [CLS]-head ReIDModel without SIE/JPM."""
    published = {}
    for key, value in model.state_dict().items():
        if key == "backbone.cls_pos":
            continue
        if key == "backbone.pos_embed":
            value = torch.cat([model.backbone.cls_pos.detach(), value], dim=1)
        if key.startswith("backbone."):
            published["base." + key[len("backbone."):]] = value
        elif key.startswith("head.necks.0."):
            published["bottleneck." + key[len("head.necks.0."):]] = value
        elif key == "head.classifier.weight":
            published["classifier.weight"] = value
        else:
            raise AssertionError(f"unexpected key {key}")
    torch.save(published, path)
    return path
