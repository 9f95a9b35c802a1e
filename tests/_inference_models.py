"""Model files for the inference / tools tests: a briefly trained demo model, untrained fine-tuned models,
backbone exports and checkpoints in the published layouts."""
from __future__ import annotations

import argparse
import contextlib
import logging
import pickle
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from passreid.config import load_config
from passreid.finetune import FinetuneConfig, build_final_checkpoint, build_model, run_training
from passreid.models import build_vit, export_backbone

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "finetune" / "demo.yaml"


def demo_config(output_dir: Path, world: Path, *overrides: str) -> FinetuneConfig:
    """configs/finetune/demo.yaml on the test session's generated world."""
    return load_config(FinetuneConfig, DEMO, [f"train.output_dir={output_dir}", f"data.root={world}/market", *overrides])


def train_demo_model(output_dir: Path, world: Path, iterations: int = 6) -> tuple[Path, FinetuneConfig]:
    """The demo recipe for a few iterations (evaluated once, at the end); returns model_final.pth and its config."""
    cfg = demo_config(output_dir, world, f"train.max_iters={iterations}", "eval.period=1000", "train.log_period=1")
    result = run_training(cfg, resume=False)
    return Path(result.final_model), cfg


@contextlib.contextmanager
def restored_passreid_logging() -> Iterator[None]:
    """Removes the handlers that run_test / training add to the passreid logger: they write to the stdout that
    pytest captured for that test, which later tests must not log to."""
    logger = logging.getLogger("passreid")
    handlers, propagate = list(logger.handlers), logger.propagate
    try:
        yield
    finally:
        for handler in [h for h in logger.handlers if h not in handlers]:
            logger.removeHandler(handler)
            handler.close()
        logger.propagate = propagate


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


_NUMPY_SCALAR = np.float64(0).__reduce__()[0]  # numpy's scalar re-constructor


class _Numpy1Pickler(pickle._Pickler):
    """Writes numpy scalars under their numpy 1.x global name ``numpy.core.multiarray.scalar``, as the published
    checkpoints were written (numpy 2 writes ``numpy._core.multiarray.scalar``)."""

    def save_global(self, obj, name=None):
        if obj is _NUMPY_SCALAR:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


_NUMPY1_PICKLE = types.ModuleType("numpy1_pickle")
_NUMPY1_PICKLE.Pickler = _Numpy1Pickler


def save_as_published(obj, path: Path) -> Path:
    """``torch.save`` with numpy scalars pickled as a numpy 1.x install (the published checkpoints') writes them."""
    torch.save(obj, path, pickle_module=_NUMPY1_PICKLE)
    return path


def published_optimizer_state(model: torch.nn.Module, iteration: int = 7) -> dict:
    """An AdamW state dict as PASS-reID's PASS/main_pass.py saves it: two param groups (utils.get_params_groups:
    regularized, then biases / norms with weight_decay 0.), whose lr and (first group's) weight_decay are set every
    iteration from numpy cosine schedules (utils.cosine_scheduler), so they are numpy.float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    regularized = [p for p in params if p.ndim > 1]
    not_regularized = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}])
    lr_schedule = 5e-4 * 0.5 * (1 + np.cos(np.pi * np.arange(20) / 20))
    wd_schedule = 0.4 + 0.5 * (0.04 - 0.4) * (1 + np.cos(np.pi * np.arange(20) / 20))
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = lr_schedule[iteration]
        if index == 0:
            group["weight_decay"] = wd_schedule[iteration]
    state = optimizer.state_dict()
    assert isinstance(state["param_groups"][0]["lr"], np.float64)
    return state


def save_published_pass_checkpoint(path: Path, vit) -> Path:
    """The published PASS pre-training checkpoint (PASS-reID PASS/main_pass.py save_dict: student, teacher,
    optimizer with numpy.float64 lr / weight decay, epoch, args, dino_loss, fp16_scaler), pickled as published."""
    state = vit.state_dict()
    head = {"head.last_layer.weight": torch.zeros(4, 8)}
    save_as_published({
        "teacher": {**{f"backbone.{k}": v for k, v in state.items()}, **head},
        "student": {**{f"module.backbone.{k}": v for k, v in state.items()},
                    **{f"module.{k}": v for k, v in head.items()}},
        "optimizer": published_optimizer_state(vit),
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_tiny", height=128, width=64, patch_size=16, lr=5e-4,
                                   global_crops_scale=(0.4, 1.0), data_path="/data/LUP", use_fp16=True),
        "dino_loss": {f"center_{n}": torch.zeros(1, 8) for n in ("cls", "pt1", "pt2", "pt3")},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                        "_growth_tracker": 0},
    }, path)
    return path


def save_published_transreid_checkpoint(path: Path, model) -> Path:
    """A published TransReID fine-tuned state dict (``base.*`` with the timm [CLS] position slot, the backbone's
    unused ImageNet classifier ``base.fc`` (1000 classes), ``bottleneck``, ``classifier``) of a passreid [CLS]-head
    ReIDModel without SIE/JPM."""
    dim = model.backbone.embed_dim
    published = {"base.fc.weight": torch.randn(1000, dim), "base.fc.bias": torch.randn(1000)}
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
