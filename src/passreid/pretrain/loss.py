"""The PASS loss: DINO cross-entropy per token type, 44 equally weighted terms (PASS-reID: PASS/main_pass.py,
``DINOLoss``).

Notation: B images, K = ``out_dim`` logits, student temperature ``ts`` (0.1), teacher temperature
``tt(epoch)`` (0.04 constant by default), one centre ``c`` per token type (``cls``, ``pt1..3``).

* student: ``log P_s = log_softmax(z_s / ts)``;
* teacher: ``P_t = softmax((z_t - c) / tt)``, no gradient;
* teacher chunk ``i`` (global view 1 or 2) is paired with every student chunk ``v != i``: a term is
  ``mean_b(-sum_d P_t,i(d) log P_s,v(d))``. [CLS]: the student chunks are the 2 global and all
  local views (2 x 10 = 20 terms for 9 locals); [Pk]: the 2 global views and the band-(k-1) local
  views (2 x 4 = 8 terms). The loss is the plain mean of all terms (44 for PASS, 20 for DINO);
* after the loss, each centre moves towards the batch mean of the raw teacher logits of both
  global views: ``c <- m c + (1 - m) sum(z_t) / (2B * world_size)`` (all-reduced over ranks).

All softmax / cross-entropy / centre arithmetic runs in float32 (float64 inputs stay float64),
also inside an autocast region.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from passreid.dist import all_reduce_mean

__all__ = ["MultiCropOutputs", "PASSLoss", "teacher_temperature_schedule"]

NUM_GLOBAL_VIEWS = 2


@dataclass
class MultiCropOutputs:
    """Head logits of one network over a multi-crop batch, grouped by token type.

    Rows are view-major: view ``v`` of image ``b`` is row ``v * batch_size + b``.

    Attributes:
        cls: ``(V * B, K)`` [CLS] logits of all ``V`` views the network saw: the 2 global views, then
            (student only) the local views in crop order (band 0's, band 1's, band 2's).
        parts: one ``(V_k * B, K)`` tensor per [PART] token ``k``: the 2 global views, then (student
            only) the band-k local views. Empty for plain DINO.
        batch_size: ``B``, the number of images.
    """

    cls: Tensor
    parts: list[Tensor]
    batch_size: int

    def token_logits(self) -> list[Tensor]:
        """``[cls, pt1, .., ptP]``."""
        return [self.cls, *self.parts]

    def num_views(self, token: int = 0) -> int:
        """Number of views (row chunks of ``batch_size``) in token type ``token`` (0 = cls)."""
        rows = self.token_logits()[token].shape[0]
        if self.batch_size <= 0 or rows % self.batch_size != 0:
            raise ValueError(
                f"token type {token} has {rows} rows, not a multiple of batch_size {self.batch_size}"
            )
        return rows // self.batch_size


def teacher_temperature_schedule(
    teacher_temp: float, warmup_teacher_temp: float, warmup_teacher_temp_epochs: int, total_epochs: int
) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up (``np.linspace``), then constant.

    As published: ``linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)`` followed by
    ``teacher_temp`` for the remaining epochs (PASS default: 0.04 throughout).
    """
    if not 0 <= warmup_teacher_temp_epochs <= total_epochs:
        raise ValueError(
            f"warmup_teacher_temp_epochs must be in [0, total_epochs={total_epochs}], got "
            f"{warmup_teacher_temp_epochs}"
        )
    if teacher_temp <= 0 or warmup_teacher_temp <= 0:
        raise ValueError(f"temperatures must be > 0, got {teacher_temp}, {warmup_teacher_temp}")
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.full(total_epochs - warmup_teacher_temp_epochs, teacher_temp),
    ))


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def _entropy_stats(teacher_log_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Mean per-row entropy of the teacher distribution and the entropy of its batch mean."""
    probs = teacher_log_probs.exp()
    per_row = -(probs * teacher_log_probs).sum(dim=-1).mean()
    mean_probs = probs.mean(dim=0)
    batch_mean = -(mean_probs * torch.log(mean_probs.clamp_min(torch.finfo(mean_probs.dtype).tiny))).sum()
    return per_row, batch_mean


class PASSLoss(nn.Module):
    """PASS / DINO multi-crop loss with one centre per token type (module docstring).

    Args:
        out_dim: K, the number of head logits.
        num_parts: [PART] tokens (3 for PASS, 0 for plain DINO).
        student_temp, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs, total_epochs:
            temperatures and the teacher temperature schedule (indexed by epoch).
        center_momentum: ``m`` of the centre update.
        num_local_crops: local views per image; with parts, a multiple of ``num_parts``
            (``num_local_crops // num_parts`` per band). Used to check the inputs and count terms.

    Buffers ``center_cls``, ``center_pt1..P`` of shape ``(1, out_dim)`` start at zero.
    """

    def __init__(
        self,
        out_dim: int = 65536,
        num_parts: int = 3,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        total_epochs: int = 100,
        center_momentum: float = 0.9,
        num_local_crops: int = 9,
    ):
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        if num_parts < 0:
            raise ValueError(f"num_parts must be >= 0, got {num_parts}")
        if num_local_crops < 0:
            raise ValueError(f"num_local_crops must be >= 0, got {num_local_crops}")
        if num_parts and num_local_crops % num_parts:
            raise ValueError(
                f"num_local_crops ({num_local_crops}) must be a multiple of num_parts ({num_parts}): "
                "each band contributes the same number of local views"
            )
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.num_parts = num_parts
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.num_local_crops = num_local_crops
        self.teacher_temp_schedule = teacher_temperature_schedule(
            teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs, total_epochs
        )
        for name in self.token_names:
            self.register_buffer(f"center_{name}", torch.zeros(1, out_dim))

    @property
    def token_names(self) -> list[str]:
        """``["cls", "pt1", .., "ptP"]``."""
        return ["cls"] + [f"pt{k}" for k in range(1, self.num_parts + 1)]

    def centers(self) -> list[Tensor]:
        """The centre buffers in token order."""
        return [getattr(self, f"center_{name}") for name in self.token_names]

    @property
    def student_views_per_token(self) -> list[int]:
        """Student views per token type: ``2 + num_local`` for cls, ``2 + num_local / P`` per part."""
        per_band = self.num_local_crops // self.num_parts if self.num_parts else 0
        return [NUM_GLOBAL_VIEWS + self.num_local_crops] + [NUM_GLOBAL_VIEWS + per_band] * self.num_parts

    @property
    def num_terms(self) -> int:
        """Number of cross-entropy terms: ``2 * (V - 1)`` per token type (44 for PASS with 9 locals)."""
        return sum(NUM_GLOBAL_VIEWS * (views - 1) for views in self.student_views_per_token)

    def teacher_temperature(self, epoch: int) -> float:
        """``tt`` at ``epoch`` (0-based)."""
        if not 0 <= epoch < len(self.teacher_temp_schedule):
            raise ValueError(
                f"epoch {epoch} is outside the teacher temperature schedule of "
                f"{len(self.teacher_temp_schedule)} epochs (total_epochs)"
            )
        return float(self.teacher_temp_schedule[epoch])

    def _check_inputs(self, student: MultiCropOutputs, teacher: MultiCropOutputs) -> None:
        if len(student.parts) != self.num_parts or len(teacher.parts) != self.num_parts:
            raise ValueError(
                f"expected {self.num_parts} part-token logits, got {len(student.parts)} (student) and "
                f"{len(teacher.parts)} (teacher)"
            )
        if student.batch_size != teacher.batch_size:
            raise ValueError(f"batch sizes differ: student {student.batch_size}, teacher {teacher.batch_size}")
        for token, (name, views) in enumerate(zip(self.token_names, self.student_views_per_token)):
            got_student, got_teacher = student.num_views(token), teacher.num_views(token)
            if got_teacher != NUM_GLOBAL_VIEWS or got_student != views:
                raise ValueError(
                    f"{name}: expected {NUM_GLOBAL_VIEWS} teacher views and {views} student views of "
                    f"{student.batch_size} images, got {got_teacher} and {got_student} "
                    f"(rows {teacher.token_logits()[token].shape[0]} and {student.token_logits()[token].shape[0]})"
                )
            for who, logits in (("student", student.token_logits()[token]), ("teacher", teacher.token_logits()[token])):
                if logits.ndim != 2 or logits.shape[1] != self.out_dim:
                    raise ValueError(f"{who} {name} logits must be (rows, {self.out_dim}), got {tuple(logits.shape)}")

    def token_loss_sum(
        self, student_logits: Tensor, teacher_logits: Tensor, center: Tensor, temp: float, batch_size: int
    ) -> tuple[Tensor, int, Tensor]:
        """Sum of the cross-entropy terms of one token type, their number, and ``log P_t``.

        A term is ``mean_b(-sum_d P_t,i log P_s,v)`` for teacher chunk ``i`` and student chunk
        ``v != i``. The terms are linear in ``log P_s``, so for each teacher chunk the sum over all
        ``v`` is one product with ``S = sum_v log P_s,v``, minus the ``v == i`` term: the student
        log-softmax runs once per row and the teacher softmax once per chunk, and no term is
        evaluated separately. Reductions use ``torch.sum`` (cascade summation), not a matmul over
        K, which keeps float32 sums exact to ~1e-7 relative at K = 65536.
        Returns ``(sum of terms, number of terms, teacher log-probabilities (2B, K))``.
        """
        dtype = _compute_dtype(student_logits)
        num_views = student_logits.shape[0] // batch_size
        student_log_probs = F.log_softmax(student_logits.to(dtype) / self.student_temp, dim=-1)
        student_log_probs = student_log_probs.view(num_views, batch_size, -1)  # (V, B, K)
        with torch.no_grad():
            teacher_log_probs = F.log_softmax((teacher_logits.detach().to(dtype) - center.to(dtype)) / temp, dim=-1)
            teacher_probs = teacher_log_probs.exp().view(NUM_GLOBAL_VIEWS, batch_size, -1)  # (2, B, K)
        all_pairs = (teacher_probs * student_log_probs.sum(dim=0)).sum()
        same_view = (teacher_probs * student_log_probs[:NUM_GLOBAL_VIEWS]).sum()
        token_sum = -(all_pairs - same_view) / batch_size
        return token_sum, NUM_GLOBAL_VIEWS * (num_views - 1), teacher_log_probs

    def forward(self, student: MultiCropOutputs, teacher: MultiCropOutputs, epoch: int) -> tuple[Tensor, dict]:
        """Loss (mean of all terms) and statistics; then updates the centres from ``teacher``.

        ``stats`` (detached 0-d tensors unless noted): ``loss_<tok>`` (mean of that token type's
        terms), ``teacher_entropy_<tok>`` (mean per-image entropy of P_t), ``teacher_batch_entropy_<tok>``
        (entropy of the batch-mean P_t; collapse diagnostics, not in the published code), ``num_terms`` (int),
        ``teacher_temp`` (float).
        """
        self._check_inputs(student, teacher)
        temp = self.teacher_temperature(epoch)
        batch_size = student.batch_size
        device_type = student.cls.device.type
        stats: dict = {}
        total = student.cls.new_zeros((), dtype=_compute_dtype(student.cls))
        num_terms = 0
        with torch.autocast(device_type=device_type, enabled=False):
            for name, s_logits, t_logits, center in zip(
                self.token_names, student.token_logits(), teacher.token_logits(), self.centers()
            ):
                token_sum, token_terms, teacher_log_probs = self.token_loss_sum(
                    s_logits, t_logits, center, temp, batch_size
                )
                total = total + token_sum
                num_terms += token_terms
                with torch.no_grad():
                    stats[f"loss_{name}"] = token_sum.detach() / token_terms
                    entropy, batch_entropy = _entropy_stats(teacher_log_probs)
                    stats[f"teacher_entropy_{name}"] = entropy
                    stats[f"teacher_batch_entropy_{name}"] = batch_entropy
            loss = total / num_terms
            self.update_centers(teacher.token_logits())
        stats["num_terms"] = num_terms
        stats["teacher_temp"] = temp
        return loss, stats

    @torch.no_grad()
    def update_centers(self, teacher_logits: list[Tensor]) -> None:
        """``c <- m c + (1 - m) sum(rows) / (rows * world_size)`` per token type, all-reduced."""
        if len(teacher_logits) != len(self.token_names):
            raise ValueError(f"expected {len(self.token_names)} teacher logit tensors, got {len(teacher_logits)}")
        rows = teacher_logits[0].shape[0]
        sums = torch.stack([logits.detach().float().sum(dim=0) for logits in teacher_logits])
        # Mean over ranks of the per-rank sums, divided by the local row count, equals the published
        # sum over all ranks / (rows * world_size); one collective for all token types.
        batch_centers = all_reduce_mean(sums) / rows
        for center, batch_center in zip(self.centers(), batch_centers):
            center.mul_(self.center_momentum).add_(batch_center.unsqueeze(0), alpha=1.0 - self.center_momentum)
