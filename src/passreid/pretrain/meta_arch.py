"""PASS self-distillation in one meta-architecture (dinov2 style): student, EMA teacher, loss.

Usage inside a training loop (the loop owns data, optimizer, schedules and checkpoints)::

    meta = PASSMetaArch("vit_small", out_dim=65536, loss_kwargs={"total_epochs": 100})
    meta.wrap_student(lambda net: DistributedDataParallel(net))     # multi-process only
    optimizer = torch.optim.AdamW(meta.param_groups())              # + per-iteration lr / wd
    for views in loader:                                             # 11 tensors (B, 3, H, W)
        optimizer.zero_grad(set_to_none=True)
        loss, stats = meta.forward_backward(views, epoch, autocast=amp.autocast, scaler=amp.scaler)
        if scaler: scaler.unscale_(optimizer)
        meta.clip_gradients(3.0)
        if epoch == 0: meta.cancel_last_layer_grads()                # freeze_last_layer = 1 epoch
        step(optimizer, scaler); meta.update_teacher(momentum_schedule[it])

State-dict layout (``meta.state_dict()``): ``student.backbone.*``, ``student.head.*``,
``teacher.backbone.*``, ``teacher.head.*``, ``loss.center_{cls,pt1,pt2,pt3}``. Below ``student.`` /
``teacher.`` every key is the published PASS name (``backbone.part_token1``,
``head.mlp_cls.0.weight``, ``head.last_layer_cls.weight_g``), and a DDP wrapper added with
:meth:`PASSMetaArch.wrap_student` is kept out of the module tree, so single- and multi-process
checkpoints have the same keys. :func:`to_published_layout` / :func:`from_published_layout` convert
to and from the published ``{"student": {"module.*"}, "teacher", "dino_loss"}`` layout.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from passreid.data.multicrop import NUM_BANDS
from passreid.engine import check_finite_on_every_rank
from passreid.models import VisionTransformer, build_vit
from passreid.pretrain.heads import PASSHead
from passreid.pretrain.loss import NUM_GLOBAL_VIEWS, MultiCropOutputs, PASSLoss

__all__ = [
    "PRETRAIN_MODES",
    "MultiCropNetwork",
    "PASSMetaArch",
    "to_published_layout",
    "from_published_layout",
]

PRETRAIN_MODES = ("pass", "dino")
ViewGroups = Sequence[tuple[Tensor, "int | None"]]


class MultiCropNetwork(nn.ModuleDict):
    """``{"backbone": ViT, "head": PASSHead}`` with a forward over groups of same-resolution views.

    A ``ModuleDict`` (``net["backbone"]`` and ``net.backbone`` both work) with a ``forward``, so it
    can be wrapped in DistributedDataParallel as one module.
    """

    def __init__(self, backbone: VisionTransformer, head: PASSHead, batch_band_views: bool = False):
        super().__init__({"backbone": backbone, "head": head})
        self.batch_band_views = batch_band_views

    def forward(self, groups: ViewGroups) -> tuple[Tensor, list[Tensor]]:
        """One backbone pass per ``(images (n, 3, H, W), part_index)`` group, then one pass per head.

        With ``batch_band_views`` the band groups (``part_index`` not ``None``) share one backbone pass, each
        image with its band's [PART] token: the same function (every op of a ViT is per image) in fewer, larger
        kernels; only the drop-path masks drawn for a seed differ. Returns ``(cls_logits, [pt1_logits, ..])``
        with rows in group order (see :meth:`PASSHead.forward_groups`).
        """
        if self.batch_band_views:
            tokens = self._band_batched_tokens(groups)
        else:
            tokens = [(self["backbone"](images, part_index=part_index), part_index) for images, part_index in groups]
        return self["head"].forward_groups(tokens)

    def _band_batched_tokens(self, groups: ViewGroups) -> list[tuple[Tensor, int | None]]:
        """Backbone tokens per group as in :meth:`forward`, the band groups' from one pass, split back."""
        bands = [(images, part_index) for images, part_index in groups if part_index is not None]
        sizes = {tuple(images.shape[1:]) for images, _ in bands}
        if len(sizes) > 1:
            raise ValueError(f"batch_band_views needs band views of one size, got {sorted(sizes)}")
        band_tokens: Iterator[Tensor] | None = None
        tokens = []
        for images, part_index in groups:
            if part_index is None:
                tokens.append((self["backbone"](images), None))
                continue
            if band_tokens is None:  # at the first band group, as the per-band passes would start
                rows = [len(band_images) for band_images, _ in bands]
                batched = torch.cat([band_images for band_images, _ in bands])
                # filled on the device: a copy from the host would wait for the queued kernels of the globals
                per_image_band = torch.cat([torch.full((n,), band, dtype=torch.long, device=batched.device)
                                            for n, (_, band) in zip(rows, bands)])
                band_tokens = iter(self["backbone"](batched, part_index=per_image_band).split(rows))
            tokens.append((next(band_tokens), part_index))
        return tokens


def _views_batch(views: Sequence[Tensor], label: str) -> Tensor:
    shapes = {tuple(v.shape) for v in views}
    if len(shapes) != 1:
        raise ValueError(f"{label} views must share one shape to be batched, got {sorted(shapes)}")
    return torch.cat(list(views)) if len(views) > 1 else views[0]


class PASSMetaArch(nn.Module):
    """Student / EMA-teacher PASS (or plain DINO) pre-training model.

    Args:
        arch: ViT name for :func:`passreid.models.build_vit` (``vit_tiny``, ``vit_small``, ``vit_base``).
        img_size: (H, W) of the global views (the position grid).
        out_dim, hidden_dim, bottleneck_dim, norm_last_layer: head settings (PASS/vision_transformer.py, ``DINOHead``).
        drop_path_rate: student stochastic depth (teacher: 0).
        mode: ``"pass"`` (3 part tokens, band locals) or ``"dino"`` (no part tokens, whole-image locals).
        loss_kwargs: extra :class:`PASSLoss` arguments (temperatures, ``total_epochs``, ...).
        local_crops_number: local views per image (``"pass"``: a multiple of 3; published 9).
        batch_band_views: the student runs the band-local views of all bands in one backbone pass (each view
            with its band's [PART] token) instead of one pass per band as published: the same function in
            fewer kernel launches; the drop-path masks a seed draws differ (see :class:`MultiCropNetwork`).

    Attributes: ``student`` and ``teacher`` (:class:`MultiCropNetwork`), ``loss`` (:class:`PASSLoss`).
    """

    def __init__(
        self,
        arch: str = "vit_small",
        img_size: Sequence[int] = (256, 128),
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        drop_path_rate: float = 0.1,
        mode: str = "pass",
        loss_kwargs: Mapping[str, Any] | None = None,
        local_crops_number: int = 9,
        batch_band_views: bool = False,
    ):
        super().__init__()
        if mode not in PRETRAIN_MODES:
            raise ValueError(f"mode must be one of {PRETRAIN_MODES}, got {mode!r}")
        if local_crops_number < 1:
            raise ValueError(f"local_crops_number must be >= 1, got {local_crops_number}")
        if mode == "pass" and local_crops_number % NUM_BANDS:
            raise ValueError(
                f"mode 'pass' needs local_crops_number to be a multiple of {NUM_BANDS} (crops per band; "
                f"published: 9), got {local_crops_number}"
            )
        loss_kwargs = dict(loss_kwargs or {})
        for fixed in ("out_dim", "num_parts", "num_local_crops"):
            if fixed in loss_kwargs:
                raise ValueError(f"loss_kwargs must not set {fixed!r}: PASSMetaArch derives it from its own arguments")
        self.arch = arch
        self.mode = mode
        self.num_parts = NUM_BANDS if mode == "pass" else 0
        self.local_crops_number = local_crops_number
        self.img_size = tuple(int(s) for s in img_size)

        def network(drop_path: float, batch_band_views: bool = False) -> MultiCropNetwork:
            backbone = build_vit(
                arch, img_size=self.img_size, drop_path_rate=drop_path,
                num_part_tokens=self.num_parts, pass_interp_quirk=True,
            )
            head = PASSHead(
                backbone.embed_dim, out_dim, num_parts=self.num_parts, hidden_dim=hidden_dim,
                bottleneck_dim=bottleneck_dim, norm_last_layer=norm_last_layer,
            )
            return MultiCropNetwork(backbone, head, batch_band_views)

        self.student = network(drop_path_rate, batch_band_views)
        self.teacher = network(0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.loss = PASSLoss(out_dim=out_dim, num_parts=self.num_parts, num_local_crops=local_crops_number, **loss_kwargs)
        self._student_wrapper: nn.Module | None = None

    # ------------------------------------------------------------------ structure
    def wrap_student(self, wrap: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Run the student through ``wrap(self.student)`` (e.g. DDP) in :meth:`forward_backward`.

        The wrapper is not registered as a submodule, so ``state_dict`` keys stay ``student.*``.
        Returns the wrapper.
        """
        wrapper = wrap(self.student)
        object.__setattr__(self, "_student_wrapper", wrapper)
        return wrapper

    def compile_backbones(self, mode: str = "default", backend: str = "inductor") -> None:
        """``torch.compile`` the student's and the teacher's ViT in place (``nn.Module.compile``: parameter names
        and checkpoints stay as they are); the heads, the loss and the optimizer stay eager.

        ``dynamic=False``: each input shape gets its own static graph (the globals, each band, whose part index is
        a constant, or all bands together with ``batch_band_views``, and the teacher's pass). Compiled kernels compute what the eager ones do up to float rounding,
        not bit for bit, and draw the drop-path masks from torch's generators as eager code does (inductor's
        ``fallback_random``; its own random numbers would give other masks than an eager run with the same
        seed). ``mode`` is torch.compile's (``default``, ``reduce-overhead`` for CUDA graphs,
        ``max-autotune-no-cudagraphs``); ``backend`` another compiler (tests use ``aot_eager``).
        """
        options = None
        if backend == "inductor":  # a mode is a set of inductor options, to which fallback_random is added
            import torch._inductor

            options = {**torch._inductor.list_mode_options(mode), "fallback_random": True}
        for network in (self.student_network, self.teacher):
            network["backbone"].compile(dynamic=False, backend=backend, options=options)

    @property
    def student_network(self) -> MultiCropNetwork:
        """The unwrapped student (also when ``self.student`` was replaced by a DDP wrapper)."""
        return getattr(self.student, "module", self.student)

    def teacher_backbone(self) -> VisionTransformer:
        """The teacher ViT: what fine-tuning starts from."""
        return self.teacher["backbone"]

    def student_view_groups(self, views: Sequence[Tensor]) -> list[tuple[Tensor, int | None]]:
        """Batched ``(images, part_index)`` groups the student sees: globals, then each band.

        ``"pass"``: ``views[0:2]`` -> ``None``; band k's ``n/3`` views -> ``k`` (published slices
        ``[2:5]``, ``[5:8]``, ``[8:11]`` for n = 9). ``"dino"``: globals and all locals, ``None``.
        """
        self._check_views(views)
        groups: list[tuple[Tensor, int | None]] = [(_views_batch(views[:NUM_GLOBAL_VIEWS], "global"), None)]
        local_views = views[NUM_GLOBAL_VIEWS:]
        if self.mode == "dino":
            return groups + [(_views_batch(local_views, "local"), None)]
        per_band = self.local_crops_number // NUM_BANDS
        for band in range(NUM_BANDS):
            band_views = local_views[band * per_band:(band + 1) * per_band]
            groups.append((_views_batch(band_views, f"band-{band} local"), band))
        return groups

    def _check_views(self, views: Sequence[Tensor]) -> None:
        expected = NUM_GLOBAL_VIEWS + self.local_crops_number
        if not isinstance(views, (list, tuple)) or len(views) != expected:
            got = len(views) if isinstance(views, (list, tuple)) else type(views).__name__
            raise ValueError(
                f"expected a list of {expected} view batches (2 global + {self.local_crops_number} local, "
                f"MultiCropAugmentation order), got {got}"
            )
        batch = views[0].shape[0] if views[0].ndim == 4 else None
        bad = [i for i, v in enumerate(views) if v.ndim != 4 or v.shape[0] != batch or v.shape[1] != 3]
        if bad:
            raise ValueError(
                f"every view must be a (B, 3, H, W) batch with the same B; views {bad} are not "
                f"(shapes {[tuple(views[i].shape) for i in bad]})"
            )

    # ------------------------------------------------------------------- training
    def forward_backward(
        self,
        views: Sequence[Tensor],
        epoch: int,
        *,
        autocast: Callable[[], ContextManager[Any]] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        loss_scale_hook: Callable[[Tensor], Tensor] | None = None,
        iteration: int | None = None,
    ) -> tuple[Tensor, dict]:
        """Teacher and student forward, PASS loss, backward. Does not step the optimizer.

        Args:
            views: ``2 + local_crops_number`` tensors ``(B, 3, H, W)`` in multi-crop order.
            epoch: 0-based epoch (teacher temperature schedule).
            autocast: factory of the autocast context (``AmpSetup.autocast``); ``None``: fp32.
                The loss maths runs in float32 regardless.
            scaler: GradScaler; backward then runs on ``scaler.scale(loss)``.
            loss_scale_hook: ``f(loss) -> tensor to backpropagate`` (e.g. divide for gradient
                accumulation); applied after ``scaler.scale`` when both are given.
            iteration: 1-based step number for the error message of a non-finite loss.

        Raises :class:`passreid.engine.NonFiniteLossError` before backward if the loss is NaN/Inf.
        Returns ``(loss.detach(), stats)`` (stats: see :meth:`PASSLoss.forward`).
        """
        amp = autocast or contextlib.nullcontext
        groups = self.student_view_groups(views)
        batch_size = views[0].shape[0]
        global_batch = groups[0][0]
        with torch.no_grad(), amp():
            teacher_cls, teacher_parts = self.teacher([(global_batch, None)])
        student = self._student_wrapper if self._student_wrapper is not None else self.student
        with amp():
            student_cls, student_parts = student(groups)
        loss, stats = self.loss(
            MultiCropOutputs(student_cls, student_parts, batch_size),
            MultiCropOutputs(teacher_cls, teacher_parts, batch_size),
            epoch,
        )
        check_finite_on_every_rank(loss, -1 if iteration is None else iteration,
                                   extra={k: v for k, v in stats.items() if k.startswith("loss_")})
        to_backward = scaler.scale(loss) if scaler is not None else loss
        if loss_scale_hook is not None:
            to_backward = loss_scale_hook(to_backward)
        to_backward.backward()
        return loss.detach(), stats

    def _paired_parameters(self) -> tuple[list[Tensor], list[Tensor]]:
        student = list(self.student_network.parameters())
        teacher = list(self.teacher.parameters())
        if len(student) != len(teacher):
            raise RuntimeError(f"student has {len(student)} parameter tensors, teacher {len(teacher)}")
        return student, teacher

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA ``teacher <- m * teacher + (1 - m) * student`` over all parameters (one foreach pass)."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        student, teacher = self._paired_parameters()
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Student parameters that receive gradients (names relative to the student network)."""
        return [(n, p) for n, p in self.student_network.named_parameters() if p.requires_grad]

    def param_groups(self) -> list[dict]:
        """AdamW groups as published: weight decay on every tensor with > 1 dim (tokens and
        positions included), none on biases and 1-D tensors (norms); frozen ``weight_g`` excluded.

        ``[{"params": regularised, "wd_multiplier": 1.0}, {"params": not regularised, "wd_multiplier": 0.0}]``.
        """
        regularized, not_regularized = [], []
        for name, param in self.named_trainable_parameters():
            if name.endswith(".bias") or param.ndim == 1:
                not_regularized.append(param)
            else:
                regularized.append(param)
        return [
            {"params": regularized, "wd_multiplier": 1.0},
            {"params": not_regularized, "wd_multiplier": 0.0},
        ]

    def cancel_last_layer_grads(self) -> None:
        """Drop the gradients of every student parameter named ``*last_layer*`` (frozen in epoch 0)."""
        for name, param in self.student_network.named_parameters():
            if "last_layer" in name:
                param.grad = None

    @torch.no_grad()
    def clip_gradients(self, max_norm: float = 3.0) -> list[float]:
        """Per-tensor clipping as published: each gradient is scaled by ``min(1, max / (norm + 1e-6))``.

        Returns the gradient norms before clipping (student parameter order, tensors with a grad).
        Call after ``scaler.unscale_(optimizer)`` under fp16.
        """
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        grads = [p.grad for p in self.student_network.parameters() if p.grad is not None]
        if not grads:
            return []
        norms = torch._foreach_norm(grads)
        # min(1, max_norm / (norm + 1e-6)) in four multi-tensor launches instead of three kernels per tensor
        # (~550 launches a step on GPU). torch evaluates a number over a tensor as reciprocal-then-multiply,
        # so this is the same arithmetic as the per-tensor expression, bit for bit.
        coefficients = torch._foreach_add(norms, 1e-6)
        torch._foreach_reciprocal_(coefficients)
        torch._foreach_mul_(coefficients, max_norm)
        torch._foreach_clamp_max_(coefficients, 1.0)
        torch._foreach_mul_(grads, coefficients)
        return torch.stack(norms).tolist()


# ------------------------------------------------------------------------ checkpoint layout
_LOSS_PREFIX = "loss."


def to_published_layout(meta_state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``PASSMetaArch.state_dict()`` -> ``{"student": {"module.<k>"}, "teacher": {k}, "dino_loss": {center_*}}``.

    That is the published ``checkpoint.pth`` layout (PASS-reID: PASS/main_pass.py, ``save_dict``) without optimizer/epoch/args.
    """
    out: dict[str, dict[str, Tensor]] = {"student": {}, "teacher": {}, "dino_loss": {}}
    for key, value in meta_state.items():
        if key.startswith("student."):
            inner = key[len("student."):]
            inner = inner[len("module."):] if inner.startswith("module.") else inner
            out["student"]["module." + inner] = value
        elif key.startswith("teacher."):
            out["teacher"][key[len("teacher."):]] = value
        elif key.startswith(_LOSS_PREFIX):
            out["dino_loss"][key[len(_LOSS_PREFIX):]] = value
        else:
            raise ValueError(f"unexpected meta-architecture state key {key!r} (expected student./teacher./loss.)")
    return out


def from_published_layout(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """Published ``{"student", "teacher", "dino_loss"}`` checkpoint -> ``PASSMetaArch`` state dict.

    ``module.`` prefixes are stripped; load the result with ``meta.load_state_dict(..)`` (strict).
    """
    missing = [k for k in ("student", "teacher") if not isinstance(checkpoint.get(k), Mapping)]
    if missing:
        raise ValueError(f"not a published PASS/DINO checkpoint: no {missing} state dict(s); keys {sorted(checkpoint)}")
    state: dict[str, Tensor] = {}
    for network in ("student", "teacher"):
        for key, value in checkpoint[network].items():
            key = key[len("module."):] if key.startswith("module.") else key
            state[f"{network}.{key}"] = value
    for key, value in (checkpoint.get("dino_loss") or {}).items():
        state[_LOSS_PREFIX + key] = value
    return state
