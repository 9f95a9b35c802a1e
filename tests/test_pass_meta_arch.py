"""PASSMetaArch and PASSHead: routing, shapes, gradient flow, EMA, parameter groups, clipping."""
from __future__ import annotations

import copy
import math

import pytest

from _spawn import process_group_of_one
import torch
import torch.nn.functional as F
from torch import nn

from passreid.engine import NonFiniteLossError
from passreid.pretrain import (
    DINOHead,
    MultiCropNetwork,
    PASSHead,
    PASSMetaArch,
    WeightNormLinear,
    from_published_layout,
    to_published_layout,
)

OUT_DIM = 256
# Narrow heads and 64x32 / 32x16 views (instead of 256x128 / 128x64, same 2:1 layout and 2x
# global/local ratio) keep the tests fast on a shared CPU; the published sizes only change shapes.
GLOBAL_HW, LOCAL_HW = (64, 32), (32, 16)
SMALL_HEAD = dict(out_dim=OUT_DIM, hidden_dim=128, bottleneck_dim=32, img_size=GLOBAL_HW)


def make_views(batch: int = 2, num_local: int = 9, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, *GLOBAL_HW, generator=gen) for _ in range(2)] + [
        torch.randn(batch, 3, *LOCAL_HW, generator=gen) for _ in range(num_local)
    ]


@pytest.fixture(scope="module")
def pristine_meta() -> PASSMetaArch:
    torch.manual_seed(0)
    return PASSMetaArch("vit_tiny", **SMALL_HEAD)


@pytest.fixture()
def meta(pristine_meta) -> PASSMetaArch:
    return copy.deepcopy(pristine_meta)


# ---------------------------------------------------------------------------- heads
@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_weight_norm_linear_matches_torch_weight_norm():
    torch.manual_seed(0)
    layer = WeightNormLinear(16, 40, freeze_gain=False)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)
    reference = torch.nn.utils.weight_norm(nn.Linear(16, 40, bias=False))
    reference.load_state_dict(layer.state_dict())  # same names and shapes as the published layer
    x = torch.randn(7, 16)
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-6)
    frozen = WeightNormLinear(16, 40)
    assert not frozen.weight_g.requires_grad and torch.equal(frozen.weight_g, torch.ones(40, 1))


def test_weight_norm_linear_backward_is_exact():
    """The hand-written backward (one buffer for the v gradient) against finite differences."""
    from passreid.pretrain.heads import _WeightNormLinearFunction

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.float64, generator=gen).requires_grad_()
    v = torch.randn(7, 6, dtype=torch.float64, generator=gen).requires_grad_()
    g = (torch.rand(7, 1, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(_WeightNormLinearFunction.apply, (x, v, g))
    assert torch.autograd.gradcheck(_WeightNormLinearFunction.apply, (x, v, g.detach()))  # frozen gain


def test_weight_norm_linear_under_bf16_autocast_keeps_fp32_gradients():
    torch.manual_seed(0)
    layer = WeightNormLinear(16, 40)
    x = torch.randn(3, 16)
    layer(x).square().sum().backward()
    reference = layer.weight_v.grad.clone()
    layer.weight_v.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.square().sum().backward()
    assert out.dtype == torch.float32 and layer.weight_v.grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight_v.grad, reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


def test_pass_head_has_published_key_layout():
    with torch.device("meta"):
        keys = set(PASSHead(32, OUT_DIM).state_dict())
    for name in ("cls", "pt1", "pt2", "pt3"):
        for index in (0, 2, 4):
            assert f"mlp_{name}.{index}.weight" in keys and f"mlp_{name}.{index}.bias" in keys
        assert f"last_layer_{name}.weight_g" in keys and f"last_layer_{name}.weight_v" in keys
    assert len(keys) == 4 * 8
    with torch.device("meta"):
        assert set(PASSHead(32, OUT_DIM, num_parts=0).state_dict()) == {k for k in keys if "cls" in k}
        head = PASSHead(384, 65536, num_parts=1)
    per_token = sum(p.numel() for n, p in head.named_parameters() if n.endswith("cls") or "_cls." in n)
    assert per_token == 22_352_128  # one DINOHead branch of PASS-reID: PASS/vision_transformer.py, ViT-S


def test_head_mlp_shape_and_normalisation():
    head = DINOHead(32, OUT_DIM, hidden_dim=64, bottleneck_dim=16)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 64), (64, 64), (64, 16)]
    assert [type(m) for m in head.mlp][1::2] == [nn.GELU, nn.GELU]
    x = torch.randn(5, 32)
    bottleneck = F.normalize(head.mlp(x), dim=-1)
    direction = head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(x), bottleneck @ direction.T, rtol=1e-5, atol=1e-6)


def test_head_routing_global_and_band():
    torch.manual_seed(0)
    head = PASSHead(32, OUT_DIM, hidden_dim=64, bottleneck_dim=16)
    tokens = torch.randn(3, 4, 32)
    outputs = head(tokens, None)
    assert len(outputs) == 4
    for position, name in enumerate(head.token_names):
        torch.testing.assert_close(outputs[position], head.project(name, tokens[:, position]))
    band = torch.randn(3, 2, 32)
    cls, part = head(band, 1)
    torch.testing.assert_close(cls, head.project("cls", band[:, 0]))
    torch.testing.assert_close(part, head.project("pt2", band[:, 1]))
    with pytest.raises(ValueError, match="expects 2 tokens"):
        head(tokens, 0)
    with pytest.raises(ValueError, match="part_index must be None or in 0..2"):
        head(band, 3)


def test_forward_groups_equals_per_call_routing():
    torch.manual_seed(0)
    head = PASSHead(32, OUT_DIM, hidden_dim=64, bottleneck_dim=16)
    groups = [(torch.randn(4, 4, 32), None)] + [(torch.randn(6, 2, 32), band) for band in range(3)]
    cls, parts = head.forward_groups(groups)
    per_call = [head(tokens, index) for tokens, index in groups]
    torch.testing.assert_close(cls, torch.cat([out[0] for out in per_call]))
    for k in range(3):
        torch.testing.assert_close(parts[k], torch.cat([per_call[0][k + 1], per_call[k + 1][1]]))


# ----------------------------------------------------------------------- structure
def test_teacher_starts_equal_frozen_and_without_drop_path(meta):
    student, teacher = meta.student.state_dict(), meta.teacher.state_dict()
    assert student.keys() == teacher.keys()
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    assert not any(p.requires_grad for p in meta.teacher.parameters())
    assert all(block.drop_path1.__class__.__name__ == "Identity" for block in meta.teacher_backbone().blocks)
    assert meta.student["backbone"].blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert meta.teacher_backbone().pass_interp_quirk and meta.teacher_backbone().num_part_tokens == 3


def test_student_outputs_match_the_published_slicing(meta):
    """One backbone call per resolution group + one head pass per head gives exactly the
    published MultiCropWrapper outputs (4 backbone calls on x[0:2], x[2:5], x[5:8], x[8:11])."""
    batch = 4
    views = make_views(batch)
    student = meta.student.eval()  # no drop path, so both computations are deterministic
    backbone, head = student["backbone"], student["head"]
    calls = []
    original_forward = backbone.forward

    def counting_forward(x, part_index=None):
        calls.append((x.shape[0], part_index))
        return original_forward(x, part_index=part_index)

    backbone.forward = counting_forward
    with torch.no_grad():
        cls, parts = student(meta.student_view_groups(views))
    assert calls == [(2 * batch, None), (3 * batch, 0), (3 * batch, 1), (3 * batch, 2)]
    assert cls.shape == (11 * batch, OUT_DIM) and [p.shape for p in parts] == [(5 * batch, OUT_DIM)] * 3
    with torch.no_grad():
        reference = [head(original_forward(torch.cat(views[0:2]), part_index=None), None)]
        for band, sl in enumerate((slice(2, 5), slice(5, 8), slice(8, 11))):
            reference.append(head(original_forward(torch.cat(views[sl]), part_index=band), band))
    torch.testing.assert_close(cls, torch.cat([r[0] for r in reference]), rtol=1e-4, atol=1e-5)
    for k in range(3):
        torch.testing.assert_close(parts[k], torch.cat([reference[0][k + 1], reference[k + 1][1]]), rtol=1e-4, atol=1e-5)
    # Teacher: one (2B, K) tensor per token type, [CLS] and the 3 parts, for the two global views.
    with torch.no_grad():
        t_cls, t_parts = meta.teacher([(torch.cat(views[:2]), None)])
    assert [t.shape for t in [t_cls, *t_parts]] == [(2 * batch, OUT_DIM)] * 4


def test_forward_backward_runs_and_leaves_teacher_without_grads(meta):
    loss, stats = meta.forward_backward(make_views(), epoch=0)
    assert loss.ndim == 0 and not loss.requires_grad
    assert stats["num_terms"] == 44
    assert 0 < loss.item() < 2 * math.log(OUT_DIM)
    assert all(p.grad is None for p in meta.teacher.parameters())
    trainable = meta.named_trainable_parameters()
    assert all(p.grad is not None for _, p in trainable)
    assert all(p.grad is None for n, p in meta.student.named_parameters() if n.endswith("weight_g"))
    assert not torch.equal(meta.loss.center_cls, torch.zeros_like(meta.loss.center_cls))


def _grad_is_zero(param: torch.Tensor) -> bool:
    return param.grad is None or not param.grad.abs().any()


def test_band_view_gradient_reaches_only_its_part_token(meta):
    """Backpropagate only the outputs of band-0 local views: part tokens 2 and 3 and their heads
    must get no gradient: a band view carries only its own part token."""
    batch = 2
    cls, parts = meta.student(meta.student_view_groups(make_views(batch)))
    band0 = slice(2 * batch, 5 * batch)  # rows of the band-0 views in cls and in pt1
    (cls[band0].logsumexp(-1).sum() + parts[0][2 * batch:].logsumexp(-1).sum()).backward()
    backbone, head = meta.student["backbone"], meta.student["head"]
    assert not _grad_is_zero(backbone.part_token1) and not _grad_is_zero(backbone.part1_pos)
    for k in (2, 3):
        assert _grad_is_zero(getattr(backbone, f"part_token{k}")) and _grad_is_zero(getattr(backbone, f"part{k}_pos"))
        assert all(_grad_is_zero(p) for p in getattr(head, f"mlp_pt{k}").parameters())
        assert _grad_is_zero(getattr(head, f"last_layer_pt{k}").weight_v)
    assert not _grad_is_zero(head.mlp_pt1[0].weight) and not _grad_is_zero(head.mlp_cls[0].weight)


def test_part_head_gets_gradient_only_from_part_terms(meta):
    cls, _ = meta.student(meta.student_view_groups(make_views()))
    cls.logsumexp(-1).sum().backward()
    head = meta.student["head"]
    for k in (1, 2, 3):
        assert all(_grad_is_zero(p) for p in getattr(head, f"mlp_pt{k}").parameters())


def test_scaler_and_loss_scale_hook_scale_the_backward(meta):
    views = make_views()
    state = {k: v.clone() for k, v in meta.state_dict().items()}
    torch.manual_seed(1)  # same drop-path draws in both runs
    meta.forward_backward(views, epoch=0)
    plain = meta.student["head"].mlp_cls[0].weight.grad.clone()

    class TimesEight:
        def scale(self, loss):
            return loss * 8

    meta.load_state_dict(state)
    meta.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    meta.forward_backward(views, epoch=0, scaler=TimesEight(), loss_scale_hook=lambda loss: loss / 2)
    torch.testing.assert_close(meta.student["head"].mlp_cls[0].weight.grad, 4 * plain, rtol=1e-4, atol=1e-7)


def test_forward_backward_under_bf16_autocast(meta):
    loss, _ = meta.forward_backward(make_views(), epoch=0, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert meta.loss.center_cls.dtype == torch.float32


def test_non_finite_loss_raises_before_backward(meta):
    views = make_views()
    views[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="step 7"):
        meta.forward_backward(views, epoch=0, iteration=7)
    assert all(p.grad is None for p in meta.student.parameters())


def test_bad_views_are_rejected(meta):
    with pytest.raises(ValueError, match="expected a list of 11 view batches"):
        meta.forward_backward(make_views(num_local=8), epoch=0)
    with pytest.raises(ValueError, match="multiple of 3"):
        PASSMetaArch("vit_tiny", local_crops_number=8, **SMALL_HEAD)


# -------------------------------------------------------------------------- training
def test_update_teacher_is_the_exact_ema(meta):
    with torch.no_grad():
        for param in meta.student.parameters():
            param.add_(torch.randn_like(param))
    old_teacher = [p.clone() for p in meta.teacher.parameters()]
    momentum = 0.996
    meta.update_teacher(momentum)
    for new, old, student in zip(meta.teacher.parameters(), old_teacher, meta.student.parameters()):
        torch.testing.assert_close(new, momentum * old + (1 - momentum) * student, rtol=0, atol=1e-6)
    meta.update_teacher(0.0)
    assert all(torch.equal(t, s) for t, s in zip(meta.teacher.parameters(), meta.student.parameters()))


def test_param_groups_follow_the_published_rule(meta):
    regularized, not_regularized = meta.param_groups()
    assert regularized["wd_multiplier"] == 1.0 and not_regularized["wd_multiplier"] == 0.0
    names = {id(p): n for n, p in meta.student.named_parameters()}
    reg = {names[id(p)] for p in regularized["params"]}
    non = {names[id(p)] for p in not_regularized["params"]}
    for token in ("cls_token", "cls_pos", "part_token1", "part3_pos", "pos_embed", "patch_embed.proj.weight"):
        assert f"backbone.{token}" in reg
    assert "head.last_layer_cls.weight_v" in reg and "head.mlp_pt2.0.weight" in reg
    assert "backbone.blocks.0.norm1.weight" in non and "backbone.norm.weight" in non
    assert "backbone.blocks.0.attn.qkv.bias" in non and "head.mlp_cls.4.bias" in non
    assert not any("weight_g" in n for n in reg | non)
    trainable = {n for n, p in meta.student.named_parameters() if p.requires_grad}
    assert reg | non == trainable and not reg & non
    with torch.device("meta"):
        unfrozen = PASSMetaArch("vit_tiny", norm_last_layer=False, **SMALL_HEAD)
    groups = unfrozen.param_groups()
    assert sum("weight_g" in n for n, p in unfrozen.student.named_parameters()
               if any(p is q for g in groups for q in g["params"])) == 4


def test_per_tensor_clipping_and_last_layer_cancel(meta):
    params = [p for _, p in meta.named_trainable_parameters()]
    gen = torch.Generator().manual_seed(0)
    for index, param in enumerate(params):
        param.grad = torch.randn(param.shape, generator=gen) * (0.001 if index % 2 else 10.0)
    before = [p.grad.clone() for p in params]
    norms = meta.clip_gradients(3.0)
    assert norms == pytest.approx([g.norm().item() for g in before], rel=1e-5)
    for old, param in zip(before, params):
        norm = old.norm().item()
        if norm > 3.0:
            assert param.grad.norm().item() == pytest.approx(3.0 * norm / (norm + 1e-6), rel=1e-5)
        else:
            assert torch.equal(param.grad, old)  # below the cap: untouched (coefficient 1)
    meta.cancel_last_layer_grads()
    for name, param in meta.student.named_parameters():
        if "last_layer" in name:
            assert param.grad is None
        elif param.requires_grad:
            assert param.grad is not None


def test_dino_mode_has_no_part_tokens_and_20_terms():
    torch.manual_seed(0)
    meta = PASSMetaArch("vit_tiny", mode="dino", local_crops_number=8, **SMALL_HEAD)
    assert meta.student["backbone"].num_part_tokens == 0 and meta.student["head"].num_parts == 0
    groups = meta.student_view_groups(make_views(num_local=8))
    assert [(g.shape[0], index) for g, index in groups] == [(4, None), (16, None)]
    _, stats = meta.forward_backward(make_views(num_local=8), epoch=0)
    assert stats["num_terms"] == 2 * 9


# ------------------------------------------------------------------ wrappers / layout
def test_wrapper_is_used_and_kept_out_of_the_state_dict(meta):
    keys = list(meta.state_dict())
    calls = []

    class Recorder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, groups):
            calls.append(len(groups))
            return self.module(groups)

    meta.wrap_student(Recorder)
    meta.forward_backward(make_views(), epoch=0)
    assert calls == [4]
    assert list(meta.state_dict()) == keys
    assert keys[0].startswith("student.backbone.") and "loss.center_pt3" in keys


def test_ddp_wrapped_student_single_process_gloo(meta, tmp_path):
    with process_group_of_one("gloo", tmp_path / "store"):
        meta.wrap_student(lambda network: nn.parallel.DistributedDataParallel(network))
        loss, stats = meta.forward_backward(make_views(), epoch=0)
        assert math.isfinite(loss.item()) and stats["num_terms"] == 44
        assert all(p.grad is not None for _, p in meta.named_trainable_parameters())


def test_published_layout_round_trip(meta):
    state = meta.state_dict()
    published = to_published_layout(state)
    assert set(published) == {"student", "teacher", "dino_loss"}
    assert "module.backbone.part_token1" in published["student"]
    assert "module.head.last_layer_pt1.weight_v" in published["student"]
    assert published["teacher"]["backbone.pos_embed"].shape == (1, 4 * 2, 192)  # patch-only positions
    assert "head.mlp_cls.0.weight" in published["teacher"]
    assert set(published["dino_loss"]) == {"center_cls", "center_pt1", "center_pt2", "center_pt3"}
    back = from_published_layout(published)
    assert back.keys() == state.keys()
    fresh = PASSMetaArch("vit_tiny", **SMALL_HEAD)
    fresh.load_state_dict(back)  # strict
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in state)


def test_multicrop_network_is_a_module_dict(meta):
    assert isinstance(meta.student, MultiCropNetwork) and isinstance(meta.student, nn.ModuleDict)
    assert meta.student["backbone"] is meta.student.backbone


def test_compiled_backbones_compute_the_eager_step(pristine_meta):
    """train.compile: the step through torch.compile'd backbones (AOT autograd's graphs, run by the aot_eager
    backend: the capture inductor compiles from, without its code generation) gives the eager loss and
    gradients, and the parameter names (checkpoints) do not change."""
    eager, compiled = copy.deepcopy(pristine_meta), copy.deepcopy(pristine_meta)
    names = list(compiled.state_dict())
    compiled.compile_backbones("default", backend="aot_eager")
    assert list(compiled.state_dict()) == names
    views = make_views()
    results = []
    for model in (eager, compiled):
        torch.manual_seed(0)  # the same drop-path draws in both
        loss, _ = model.forward_backward(views, epoch=0)
        results.append((loss, {n: p.grad for n, p in model.named_trainable_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    # AOT autograd decomposes some ops (layer norm, GELU, attention backward) into other float32 arithmetic:
    # equal up to float32 rounding accumulated over the tiny ViT's 4 blocks, far below the size of any gradient's
    # change from one step's inputs to another's
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
    assert eager_grads.keys() == compiled_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_batched_band_views_compute_the_per_band_step():
    """train.batch_band_views: one student backbone pass over the 9 band views (2 passes instead of 4) gives the
    per-band step's loss and gradients. Drop path off: its masks are the one thing that differs for a seed."""
    torch.manual_seed(0)
    per_band = PASSMetaArch("vit_tiny", drop_path_rate=0.0, **SMALL_HEAD)
    batched = copy.deepcopy(per_band)
    batched.student.batch_band_views = True
    views = make_views(batch=3)
    results = []
    for model in (per_band, batched):
        passes = []
        hook = model.student["backbone"].register_forward_hook(lambda module, args, out: passes.append(len(args[0])))
        loss, _ = model.forward_backward(views, epoch=0)
        hook.remove()
        results.append((passes, loss, {n: p.grad for n, p in model.named_trainable_parameters() if p.grad is not None}))
    (passes, loss, grads), (batched_passes, batched_loss, batched_grads) = results
    assert passes == [6, 9, 9, 9] and batched_passes == [6, 27]  # globals, then the bands' 3 x 3 views
    # the same per-image arithmetic; matmuls over other row counts and the [PART] gradients summed in another
    # order differ by float32 rounding, orders of magnitude below any gradient's size
    assert batched_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert grads.keys() == batched_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(batched_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_batched_band_views_need_band_views_of_one_size(meta):
    meta.student.batch_band_views = True
    views = make_views()
    views[-3:] = [torch.randn(2, 3, 48, 16)] * 3  # band 2's views taller than the other bands'
    with pytest.raises(ValueError, match="band views of one size"):
        meta.forward_backward(views, epoch=0)
