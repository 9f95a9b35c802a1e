"""Optimiser parameter groups and the per-epoch warm-up cosine schedule with both stepping conventions."""
from __future__ import annotations

import math

import pytest
import torch

from passreid.engine.optim import build_param_groups, make_optimizer
from passreid.finetune.config import FinetuneOptimConfig
from passreid.finetune.optim import epoch_learning_rates, schedule_epoch
from passreid.models import build_vit
from passreid.models.reid import ReIDModel

LR = 4e-4


def _model() -> ReIDModel:
    torch.manual_seed(0)
    return ReIDModel(build_vit("vit_tiny", img_size=(64, 32)), num_classes=5, num_cameras=2)


def test_param_groups_bias_lr_x2_and_frozen_bn_bias_left_out():
    model = _model()
    groups = build_param_groups(model, lr=LR, weight_decay=1e-4, weight_decay_bias=5e-4, bias_lr_factor=2.0)
    by_name = {group["name"]: group for group in groups}
    assert by_name["default"]["lr"] == LR and by_name["default"]["weight_decay"] == 1e-4
    assert by_name["bias"]["lr"] == 2 * LR and by_name["bias"]["weight_decay"] == 5e-4

    names = {id(p): n for n, p in model.named_parameters()}
    bias_names = {names[id(p)] for p in by_name["bias"]["params"]}
    default_names = {names[id(p)] for p in by_name["default"]["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert bias_names | default_names == trainable and not bias_names & default_names
    assert bias_names == {n for n in trainable if "bias" in n}
    # Positions, tokens, LN weights and the SIE table are decayed like weights (no no-decay list).
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.norm.weight", "sie_embed"} <= default_names
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"head.necks.{k}.bias" for k in range(4)}


def _optimizer(model: ReIDModel, cfg: FinetuneOptimConfig) -> torch.optim.Optimizer:
    groups = build_param_groups(model, cfg.lr, cfg.weight_decay, cfg.weight_decay_bias, cfg.bias_lr_factor)
    return make_optimizer(groups, cfg)


def test_make_optimizer_sgd_momentum_and_groups():
    optimizer = _optimizer(_model(), FinetuneOptimConfig(lr=LR, momentum=0.9))
    assert isinstance(optimizer, torch.optim.SGD)
    assert [g["lr"] for g in optimizer.param_groups] == [LR, 2 * LR]
    assert all(g["momentum"] == 0.9 for g in optimizer.param_groups)


def expected_lr(t: int, base: float, warmup: int = 20, epochs: int = 120) -> float:
    """timm CosineLRScheduler with warmup_lr_init = 0.01 LR and lr_min = 0.002 LR (LR = the base lr)."""
    start, floor = 0.01 * LR, 0.002 * LR
    if t < warmup:
        return start + t * (base - start) / warmup
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t / epochs))


def _scheduled_lrs(stepping: str, epochs: list[int]) -> list[list[float]]:
    cfg = FinetuneOptimConfig(lr=LR, warmup_epochs=20, lr_stepping=stepping)
    optimizer = _optimizer(_model(), cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # the weights' and the biases' (2x) rates
    return [epoch_learning_rates(cfg, epoch, 120, base_lrs) for epoch in epochs]


@pytest.mark.parametrize("stepping,offset", [("pass", 0), ("transreid", 1)])
def test_schedule_values_at_epochs(stepping, offset):
    epochs = [0, 1, 10, 19, 20, 60, 119]
    for epoch, (lr, bias_lr) in zip(epochs, _scheduled_lrs(stepping, epochs)):
        t = epoch + offset
        assert lr == pytest.approx(expected_lr(t, LR), rel=1e-9), (stepping, epoch)
        assert bias_lr == pytest.approx(expected_lr(t, 2 * LR), rel=1e-9), (stepping, epoch)


def test_pass_stepping_starts_at_warmup_init_and_transreid_one_step_later():
    (pass_first,), (tr_first,) = _scheduled_lrs("pass", [0]), _scheduled_lrs("transreid", [0])
    assert pass_first[0] == pytest.approx(0.01 * LR)  # PASS: epoch 1 runs at warmup_lr_init
    assert tr_first[0] == pytest.approx(0.01 * LR + (LR - 0.01 * LR) / 20)
    # Known values: the cosine phase is not shifted by the warm-up (t=20 is already below the base lr).
    (at_20,) = _scheduled_lrs("pass", [20])
    assert at_20[0] == pytest.approx(0.002 * LR + 0.5 * (LR - 0.002 * LR) * (1 + math.cos(math.pi / 6)))
    assert at_20[0] < LR
    with pytest.raises(ValueError, match="'pass' or 'transreid'"):
        schedule_epoch(0, "timm")
