"""DINO projection heads and the PASS four-head module (PASS-reID: PASS/vision_transformer.py,
``DINOHead``).

One head maps a token ``(.., D)`` to ``out_dim`` logits:
``Linear(D, 2048) -> GELU -> Linear(2048, 2048) -> GELU -> Linear(2048, 256)`` (no BatchNorm), L2
normalisation, then a weight-normalised ``Linear(256, out_dim, bias=False)`` whose gain ``weight_g``
starts at 1 and is frozen when ``norm_last_layer`` (the PASS default for ViT-S and ViT-B).

:class:`PASSHead` keeps one such head per token type under the published attribute names
(``mlp_cls``, ``mlp_pt1..3``, ``last_layer_cls``, ``last_layer_pt1..3``), so a published
``checkpoint.pth`` loads into it key for key (``head.mlp_cls.0.weight``,
``head.last_layer_cls.weight_g`` / ``weight_v``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

__all__ = ["WeightNormLinear", "build_projection_mlp", "DINOHead", "PASSHead"]


class _WeightNormLinearFunction(torch.autograd.Function):
    """``y = (x @ v.T) * s`` with ``s = g / ||v||`` (row norms), with a hand-written backward.

    Autograd through ``linalg.vector_norm`` would build three extra ``(out, in)`` temporaries per
    call (65536 x 256 floats each, 64 MiB) and add them up; here the whole ``v`` gradient is one
    buffer: ``grad_v = (grad_y * s).T @ x - (s * grad_s / ||v||^2)[:, None] * v`` with
    ``grad_s = sum_rows(grad_y * (x @ v.T))``, and ``grad_g = grad_s / ||v||``.
    The matrix products run in the autocast dtype when autocast is on (like ``F.linear``); the
    scale, the output and the ``v`` / ``g`` gradients stay in the parameters' precision (>= fp32).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight_v: Tensor, weight_g: Tensor) -> Tensor:
        param_dtype = torch.promote_types(weight_v.dtype, torch.float32)
        norms = torch.linalg.vector_norm(weight_v.to(param_dtype), dim=1)
        scale = weight_g.squeeze(1).to(param_dtype) / norms
        raw = F.linear(x, weight_v)  # autocast (if enabled) picks the matmul dtype
        ctx.save_for_backward(x, weight_v, weight_g, norms, scale, raw)
        return raw * scale

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight_v, weight_g, norms, scale, raw = ctx.saved_tensors
        matmul_dtype = raw.dtype
        grad_raw = grad_out * scale  # dL/d(x @ v.T)
        grad_x = grad_v = grad_g = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_raw.to(matmul_dtype) @ weight_v.to(matmul_dtype)).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_scale = (grad_out * raw).sum(dim=0)  # dL/ds, (out,)
            if ctx.needs_input_grad[2]:
                grad_g = (grad_scale / norms).unsqueeze(1).to(weight_g.dtype)
            if ctx.needs_input_grad[1]:
                # ds/dv = -(g / ||v||^3) v  ->  norm part of the v gradient, then the product part in place.
                grad_v = weight_v * (-(scale * grad_scale) / norms.square()).unsqueeze(1).to(weight_v.dtype)
                product_lhs, product_rhs = grad_raw.T, x
                if matmul_dtype == grad_v.dtype:
                    grad_v.addmm_(product_lhs.to(grad_v.dtype), product_rhs.to(grad_v.dtype))
                else:
                    grad_v += (product_lhs.to(matmul_dtype) @ product_rhs.to(matmul_dtype)).to(grad_v.dtype)
        return grad_x, grad_v, grad_g


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``g * v / ||v||`` (row norms), i.e. ``weight_norm(Linear)``.

    Parameters ``weight_g`` ``(out, 1)`` and ``weight_v`` ``(out, in)`` have the names and shapes of
    ``torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))``, so published state dicts load.
    The normalised weight is never materialised: the layer computes ``(x @ v.T) * (g / ||v||)``,
    the same function, with a backward that allocates only the ``v`` gradient itself
    (:class:`_WeightNormLinearFunction`); at out = 65536 the extra (out x in) buffers of plain
    autograd cost as much time as the product.
    """

    def __init__(self, in_features: int, out_features: int, freeze_gain: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Direction initialised like nn.Linear's default weight (as DINO's weight_norm(nn.Linear)).
        linear = nn.Linear(in_features, out_features, bias=False)
        # Registration order g, v as in torch's weight_norm (state-dict and parameters() order).
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not freeze_gain)
        self.weight_v = nn.Parameter(linear.weight.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        """``(.., in)`` -> ``(.., out)``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        leading = x.shape[:-1]
        out = _WeightNormLinearFunction.apply(x.reshape(-1, self.in_features), self.weight_v, self.weight_g)
        return out.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        frozen = not self.weight_g.requires_grad
        return f"in_features={self.in_features}, out_features={self.out_features}, gain_frozen={frozen}"


def build_projection_mlp(in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, num_layers: int = 3) -> nn.Sequential:
    """DINO's projection MLP without BatchNorm: Linear/GELU pairs, last Linear to ``bottleneck_dim``.

    With 3 layers the Linear modules sit at indices 0, 2, 4 (the published key layout).
    Weights trunc_normal(0.02), biases zero.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_layers == 1:
        layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
    else:
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(num_layers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    mlp = nn.Sequential(*layers)
    for module in mlp:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    return mlp


def _project(mlp: nn.Module, last_layer: WeightNormLinear, x: Tensor) -> Tensor:
    return last_layer(F.normalize(mlp(x), dim=-1, p=2))


class DINOHead(nn.Module):
    """One DINO head: ``mlp`` -> L2-normalise -> ``last_layer`` (weight-normed, gain frozen if asked).

    Key layout ``mlp.{0,2,4}.*``, ``last_layer.weight_g/weight_v`` (the DINO / TransReID-SSL names).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        self.mlp = build_projection_mlp(in_dim, hidden_dim, bottleneck_dim, num_layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_gain=norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        """``(.., in_dim)`` -> ``(.., out_dim)`` logits."""
        return _project(self.mlp, self.last_layer, x)


class PASSHead(nn.Module):
    """Independent DINO heads for [CLS] and each [PART] token, routed as published.

    ``num_parts=3`` is PASS; ``num_parts=0`` keeps only the [CLS] head (plain DINO).

    Routing of backbone outputs ``tokens`` ``(B, T, D)``:
    * global view (``part_index=None``): ``T = 1 + num_parts`` -> ``[cls, pt1, .., ptP]`` logits;
    * band-k local view (``part_index=k``): ``T = 2`` -> ``[cls, pt(k+1)]``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        num_parts: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        if num_parts < 0:
            raise ValueError(f"num_parts must be >= 0, got {num_parts}")
        self.num_parts = num_parts
        self.out_dim = out_dim
        for name in self.token_names:
            setattr(self, f"mlp_{name}", build_projection_mlp(in_dim, hidden_dim, bottleneck_dim, num_layers))
        for name in self.token_names:
            setattr(self, f"last_layer_{name}", WeightNormLinear(bottleneck_dim, out_dim, freeze_gain=norm_last_layer))

    @property
    def token_names(self) -> list[str]:
        """``["cls", "pt1", .., "ptP"]``: one head per name."""
        return ["cls"] + [f"pt{k}" for k in range(1, self.num_parts + 1)]

    def project(self, name: str, x: Tensor) -> Tensor:
        """Logits of head ``name`` (``"cls"`` or ``"ptk"``) for features ``(.., D)``."""
        if name not in self.token_names:
            raise ValueError(f"unknown head {name!r}; this PASSHead has {self.token_names}")
        return _project(getattr(self, f"mlp_{name}"), getattr(self, f"last_layer_{name}"), x)

    def _route(self, tokens: Tensor, part_index: int | None) -> list[tuple[str, Tensor]]:
        """``(head name, features (B, D))`` for each output token of one backbone call."""
        if tokens.ndim != 3:
            raise ValueError(f"expected backbone outputs shaped (B, T, D), got {tuple(tokens.shape)}")
        if part_index is None:
            expected = 1 + self.num_parts
            names = self.token_names
        else:
            if not 0 <= part_index < self.num_parts:
                raise ValueError(
                    f"part_index must be None or in 0..{self.num_parts - 1} (this head has "
                    f"{self.num_parts} part heads), got {part_index}"
                )
            expected = 2
            names = ["cls", f"pt{part_index + 1}"]
        if tokens.shape[1] != expected:
            raise ValueError(
                f"part_index={part_index} expects {expected} tokens per image ({names}), got "
                f"tokens of shape {tuple(tokens.shape)}"
            )
        return [(name, tokens[:, position]) for position, name in enumerate(names)]

    def forward(self, tokens: Tensor, part_index: int | None = None) -> list[Tensor]:
        """Logits per output token, in token order (see the class docstring)."""
        return [self.project(name, feats) for name, feats in self._route(tokens, part_index)]

    def forward_groups(self, groups: Sequence[tuple[Tensor, int | None]]) -> tuple[Tensor, list[Tensor]]:
        """Run several backbone calls' outputs through the heads, one pass per head.

        ``groups``: ``(tokens (n_i, T_i, D), part_index_i)`` per backbone call. Rows that go to the
        same head are concatenated in group order, so each head runs once (its 65536-wide last
        layer is read once, not once per call). Returns ``(cls_logits, [pt1_logits, ..])``:
        ``cls`` holds every group's rows; ``ptk`` the rows of the groups that carry [Pk] (global
        calls and band-(k-1) calls). The same function as calling :meth:`forward` per group and
        concatenating.
        """
        if not groups:
            raise ValueError("forward_groups needs at least one (tokens, part_index) group")
        rows: dict[str, list[Tensor]] = {name: [] for name in self.token_names}
        for tokens, part_index in groups:
            for name, feats in self._route(tokens, part_index):
                rows[name].append(feats)
        logits = {name: self.project(name, torch.cat(feats) if len(feats) > 1 else feats[0])
                  for name, feats in rows.items() if feats}
        missing = [name for name in self.token_names if name not in logits]
        if missing:
            raise ValueError(f"no group carries the tokens {missing}; include a global-view group")
        return logits["cls"], [logits[name] for name in self.token_names[1:]]
