"""PASSLoss: known values, the 44-term published pairing against a slow double loop, centres, schedule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from passreid.pretrain import MultiCropOutputs, PASSLoss, teacher_temperature_schedule

BANDS = 3


def random_outputs(batch: int, out_dim: int, num_local: int, num_parts: int = 3, dtype=torch.float64, seed: int = 0):
    """Student / teacher outputs with random logits in the MultiCropOutputs layout."""
    gen = torch.Generator().manual_seed(seed)

    def logits(views: int) -> torch.Tensor:
        return (torch.randn(views * batch, out_dim, generator=gen, dtype=dtype) * 3).requires_grad_()

    per_band = num_local // num_parts if num_parts else 0
    student = MultiCropOutputs(logits(2 + num_local), [logits(2 + per_band) for _ in range(num_parts)], batch)
    teacher = MultiCropOutputs(
        logits(2).detach(), [logits(2).detach() for _ in range(num_parts)], batch
    )
    return student, teacher


def slow_reference_loss(student, teacher, centers, student_temp, teacher_temp):
    """The published double loop, written out term by term from the formula (PASS-reID: PASS/main_pass.py, ``DINOLoss``)."""
    batch = student.batch_size
    total, count = 0.0, 0
    per_token_counts = []
    for s_logits, t_logits, center in zip(student.token_logits(), teacher.token_logits(), centers):
        s_chunks = (s_logits.detach() / student_temp).chunk(s_logits.shape[0] // batch)
        t_chunks = F.softmax((t_logits - center) / teacher_temp, dim=-1).chunk(2)
        token_count = 0
        for i, q in enumerate(t_chunks):
            for v, s in enumerate(s_chunks):
                if v == i:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                token_count += 1
        per_token_counts.append(token_count)
        count += token_count
    return total / count, count, per_token_counts


def test_uniform_outputs_give_log_k():
    out_dim, batch = 256, 3
    loss_fn = PASSLoss(out_dim=out_dim)
    student = MultiCropOutputs(torch.zeros(11 * batch, out_dim), [torch.zeros(5 * batch, out_dim)] * 3, batch)
    teacher = MultiCropOutputs(torch.zeros(2 * batch, out_dim), [torch.zeros(2 * batch, out_dim)] * 3, batch)
    loss, stats = loss_fn(student, teacher, epoch=0)
    assert loss.item() == pytest.approx(math.log(out_dim), abs=1e-6)
    assert stats["num_terms"] == 44


def test_uniform_outputs_give_log_k_at_published_width():
    out_dim, batch = 65536, 1
    loss_fn = PASSLoss(out_dim=out_dim)
    student = MultiCropOutputs(torch.zeros(11 * batch, out_dim), [torch.zeros(5 * batch, out_dim)] * 3, batch)
    teacher = MultiCropOutputs(torch.zeros(2 * batch, out_dim), [torch.zeros(2 * batch, out_dim)] * 3, batch)
    loss, stats = loss_fn(student, teacher, epoch=0)
    assert loss.item() == pytest.approx(math.log(65536), abs=2e-6)  # 11.0904; fp32 ulp there is 1e-6
    for name in ("cls", "pt1", "pt2", "pt3"):
        assert stats[f"teacher_entropy_{name}"].item() == pytest.approx(math.log(65536), abs=1e-4)


def test_term_count_and_pairing_match_the_double_loop_float64():
    out_dim, batch = 64, 4
    loss_fn = PASSLoss(out_dim=out_dim, teacher_temp=0.07, warmup_teacher_temp=0.07).double()
    for center in loss_fn.centers():  # non-zero centres must be subtracted from the teacher only
        center.copy_(torch.randn_like(center))
    centers = [c.clone() for c in loss_fn.centers()]
    student, teacher = random_outputs(batch, out_dim, num_local=9)
    loss, stats = loss_fn(student, teacher, epoch=0)
    expected, count, per_token = slow_reference_loss(student, teacher, centers, 0.1, 0.07)
    assert count == 44 and per_token == [20, 8, 8, 8]
    assert stats["num_terms"] == 44 == loss_fn.num_terms
    assert abs(loss.item() - expected.item()) < 1e-10
    # Per-token-type losses are the means of that type's terms.
    for token in range(4):
        sub_student = MultiCropOutputs(student.token_logits()[token], [], batch)
        sub_teacher = MultiCropOutputs(teacher.token_logits()[token], [], batch)
        sub_expected, _, _ = slow_reference_loss(sub_student, sub_teacher, [centers[token]], 0.1, 0.07)
        name = loss_fn.token_names[token]
        assert abs(stats[f"loss_{name}"].item() - sub_expected.item()) < 1e-10


def test_float32_matches_the_double_loop_and_gradients_agree():
    out_dim, batch = 256, 2
    loss_fn = PASSLoss(out_dim=out_dim)
    student, teacher = random_outputs(batch, out_dim, num_local=9, dtype=torch.float32, seed=3)
    loss, _ = loss_fn(student, teacher, epoch=0)
    loss.backward()
    grads = [t.grad.clone() for t in student.token_logits()]
    for t in student.token_logits():
        t.grad = None
    zero_centers = [torch.zeros(1, out_dim)] * 4
    # Reference with gradients: recompute with the slow loop on the same leaves.
    total, count = 0.0, 0
    for s_logits, t_logits, center in zip(student.token_logits(), teacher.token_logits(), zero_centers):
        s_chunks = (s_logits / 0.1).chunk(s_logits.shape[0] // batch)
        q_chunks = F.softmax((t_logits - center) / 0.04, dim=-1).chunk(2)
        for i, q in enumerate(q_chunks):
            for v, s in enumerate(s_chunks):
                if v != i:
                    total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                    count += 1
    expected = total / count
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-6 * abs(expected.item())
    for got, t in zip(grads, student.token_logits()):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-8)


def test_teacher_logits_get_no_gradient():
    student, teacher = random_outputs(2, 32, num_local=9, dtype=torch.float32)
    teacher.cls.requires_grad_()
    loss, _ = PASSLoss(out_dim=32)(student, teacher, epoch=0)
    loss.backward()
    assert teacher.cls.grad is None


def test_dino_mode_has_20_terms():
    out_dim, batch = 32, 2
    loss_fn = PASSLoss(out_dim=out_dim, num_parts=0, num_local_crops=9).double()
    student, teacher = random_outputs(batch, out_dim, num_local=9, num_parts=0)
    loss, stats = loss_fn(student, teacher, epoch=0)
    expected, count, _ = slow_reference_loss(student, teacher, [torch.zeros(1, out_dim, dtype=torch.float64)], 0.1, 0.04)
    assert count == 20 == stats["num_terms"]
    assert abs(loss.item() - expected.item()) < 1e-10


def test_centre_update_from_zero_is_a_tenth_of_the_batch_mean():
    out_dim, batch = 16, 3
    loss_fn = PASSLoss(out_dim=out_dim)
    student, teacher = random_outputs(batch, out_dim, num_local=9, dtype=torch.float32)
    loss_fn(student, teacher, epoch=0)
    for center, logits in zip(loss_fn.centers(), teacher.token_logits()):
        torch.testing.assert_close(center, 0.1 * logits.mean(dim=0, keepdim=True), rtol=1e-6, atol=1e-7)
    # Second step: c <- 0.9 c + 0.1 mean.
    previous = [c.clone() for c in loss_fn.centers()]
    loss_fn(student, teacher, epoch=0)
    for center, old, logits in zip(loss_fn.centers(), previous, teacher.token_logits()):
        torch.testing.assert_close(center, 0.9 * old + 0.1 * logits.mean(dim=0, keepdim=True), rtol=1e-6, atol=1e-7)


def test_centres_are_used_before_they_are_updated():
    """The loss of a call uses the centres as they were before that call (update comes after)."""
    out_dim, batch = 16, 2
    loss_fn = PASSLoss(out_dim=out_dim).double()
    student, teacher = random_outputs(batch, out_dim, num_local=9)
    loss, _ = loss_fn(student, teacher, epoch=0)
    expected, _, _ = slow_reference_loss(student, teacher, [torch.zeros(1, out_dim)] * 4, 0.1, 0.04)
    assert abs(loss.item() - expected.item()) < 1e-10


def test_loss_math_is_fp32_under_autocast():
    student, teacher = random_outputs(2, 32, num_local=9, dtype=torch.bfloat16)
    loss_fn = PASSLoss(out_dim=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = loss_fn(student, teacher, epoch=0)
    assert loss.dtype == torch.float32
    assert loss_fn.center_cls.dtype == torch.float32
    as_float = MultiCropOutputs(student.cls.float(), [p.float() for p in student.parts], 2)
    teacher_float = MultiCropOutputs(teacher.cls.float(), [p.float() for p in teacher.parts], 2)
    expected, _, _ = slow_reference_loss(as_float, teacher_float, [torch.zeros(1, 32)] * 4, 0.1, 0.04)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_teacher_temperature_schedule():
    np.testing.assert_allclose(teacher_temperature_schedule(0.04, 0.04, 0, 100), np.full(100, 0.04))
    schedule = teacher_temperature_schedule(0.07, 0.04, 30, 100)
    assert len(schedule) == 100
    np.testing.assert_allclose(schedule[:30], np.linspace(0.04, 0.07, 30))
    np.testing.assert_allclose(schedule[30:], 0.07)
    loss_fn = PASSLoss(out_dim=8, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30, total_epochs=100)
    assert loss_fn.teacher_temperature(0) == pytest.approx(0.04)
    assert loss_fn.teacher_temperature(99) == pytest.approx(0.07)
    with pytest.raises(ValueError, match="outside the teacher temperature schedule"):
        loss_fn.teacher_temperature(100)


def test_bad_inputs_are_rejected_with_clear_errors():
    loss_fn = PASSLoss(out_dim=16)
    student, teacher = random_outputs(2, 16, num_local=6, dtype=torch.float32)
    with pytest.raises(ValueError, match="expected 2 teacher views and 11 student views"):
        loss_fn(student, teacher, epoch=0)
    with pytest.raises(ValueError, match="multiple of num_parts"):
        PASSLoss(out_dim=16, num_local_crops=8)
