"""The supervised re-ID and Cluster-Contrast meta-architectures: one forward_backward is the plain forward, loss
and backward of their parts; their parameter groups are the shared ones; a DDP-style wrapper stays out of the
module tree (checkpoint keys unchanged); a non-finite loss stops before backward."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from passreid.config import load_config
from passreid.engine import NonFiniteLossError
from passreid.engine.optim import build_param_groups
from passreid.finetune import FinetuneConfig
from passreid.finetune.meta_arch import ReIDBatch, ReIDMetaArch
from passreid.usl import UslConfig
from passreid.usl.meta_arch import ClusterContrastMetaArch
from passreid.usl.model import build_usl_model

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.img_size=[64,32]", "model.pretrained=none", "model.drop_path_rate=0.0"]


class _Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: forwards to the module it holds as ``module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _reid_meta() -> tuple[ReIDMetaArch, FinetuneConfig, ReIDBatch]:
    torch.manual_seed(0)
    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo.yaml", SMALL)
    meta = ReIDMetaArch.from_config(cfg, 4, 2, load_weights=False, device=torch.device("cpu"))
    batch = ReIDBatch.from_loader({"img": torch.randn(8, 3, 64, 32), "pid": torch.arange(4).repeat_interleave(2),
                                   "camid": torch.tensor([0, 1] * 4), "index": torch.arange(8)}, torch.device("cpu"))
    return meta, cfg, batch


def test_reid_forward_backward_is_the_plain_loss_backward_and_the_wrapper_stays_out_of_the_keys():
    meta, cfg, batch = _reid_meta()
    reference = copy.deepcopy(meta.model)
    keys = list(meta.model.state_dict())
    wrapper = meta.distribute(_Wrapper, global_batch=False, device=torch.device("cpu"))
    assert list(meta.model.state_dict()) == keys and not any("module." in k for k in meta.state_dict())
    terms = meta.forward_backward(batch)
    assert wrapper.calls == 1 and {"loss"} <= set(terms) and not terms["loss"].requires_grad
    expected = meta.criterion(reference(batch.images, camids=batch.camids), batch.pids)
    expected["loss"].backward()
    # Same operations in the same order on the same CPU thread count: equal to float rounding at most.
    assert float(terms["loss"]) == pytest.approx(float(expected["loss"].detach()), rel=1e-6)
    for (name, param), ref in zip(meta.model.named_parameters(), reference.parameters()):
        if ref.grad is not None:
            torch.testing.assert_close(param.grad, ref.grad, rtol=1e-5, atol=1e-7, msg=name)
    groups = meta.param_groups(cfg.optim)
    shared = build_param_groups(meta.model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.weight_decay_bias,
                                cfg.optim.bias_lr_factor)
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in g["params"]] for g in shared]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(g["lr"], g["weight_decay"]) for g in shared]


def test_reid_non_finite_loss_stops_before_backward():
    meta, _, batch = _reid_meta()
    with torch.no_grad():
        next(meta.model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError):
        meta.forward_backward(batch, iteration=7)
    assert all(p.grad is None for p in meta.model.parameters())
    with pytest.raises(RuntimeError, match="no second pass"):
        meta.second_pass_step(batch)


def test_cluster_contrast_forward_backward_is_the_memory_loss_and_updates_the_memory():
    torch.manual_seed(0)
    cfg = load_config(UslConfig, REPO / "configs" / "usl" / "demo.yaml", SMALL)
    meta = ClusterContrastMetaArch(build_usl_model(cfg.model, load_weights=False),
                                   temperature=0.05, momentum=0.2, use_hard=False)
    meta.memory.reset(torch.randn(3, meta.memory.num_features))
    reference = copy.deepcopy(meta)
    images, targets = torch.randn(6, 3, 64, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    keys = list(meta.model.state_dict())
    meta.distribute(_Wrapper)
    assert list(meta.model.state_dict()) == keys and meta.forward_module.calls == 0
    before = meta.memory.features.clone()
    loss = meta.forward_backward(images, targets)
    assert meta.forward_module.calls == 1 and not loss.requires_grad
    expected = reference.memory(reference.net(images), targets)
    expected.backward()
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-6)  # same ops, CPU rounding at most
    assert not torch.equal(meta.memory.features, before)  # updated inside backward
    torch.testing.assert_close(meta.memory.features, reference.memory.features, rtol=1e-5, atol=1e-6)
    for param, ref in zip(meta.model.parameters(), reference.model.parameters()):
        if ref.grad is not None:
            torch.testing.assert_close(param.grad, ref.grad, rtol=1e-5, atol=1e-7)
    multipliers = {g["name"]: g["lr_multiplier"] for g in meta.param_groups(cfg.optim)}
    assert multipliers == {"default": 1.0, "bias": pytest.approx(cfg.optim.bias_lr_factor)}
