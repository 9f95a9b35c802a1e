"""The one Vision Transformer of passreid: timm blocks plus the PASS [CLS]/[PART] token layout.

Token layout (PASS-reID: PASS/vision_transformer.py and PASS_transreid/model/backbones/vit_pytorch.py):

* learnable tokens ``cls_token`` and ``part_token1..K`` (each ``(1, 1, D)``), each with its own
  learnable position vector ``cls_pos`` / ``part1_pos..partK_pos`` (each ``(1, 1, D)``);
* ``pos_embed`` of shape ``(1, num_patches, D)`` covers the patch tokens only (no [CLS] slot);
* a global view carries ``[CLS, P1..PK, patches]``; a band-k local view (``part_index=k``)
  carries ``[CLS, P(k+1), patches]``; ``num_part_tokens=0`` gives the plain DINO/TransReID
  ``[CLS, patches]`` layout (still with the separate ``cls_pos``).

Parameter names equal the published PASS ones, so a converted PASS backbone loads with no renaming.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

__all__ = [
    "ViTArch",
    "VIT_ARCHS",
    "OverlapPatchEmbed",
    "VisionTransformer",
    "build_vit",
    "list_vit_archs",
    "patch_grid_size",
    "interpolate_pos_grid",
]


@dataclass(frozen=True)
class ViTArch:
    """Width/depth hyper-parameters of a named ViT architecture."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True


VIT_ARCHS: dict[str, ViTArch] = {
    # Small enough for unit tests and CPU demos; not a published architecture.
    "vit_tiny": ViTArch(embed_dim=192, depth=4, num_heads=3),
    # DeiT-S / DINO / PASS ViT-S/16 (not TransReID's 768-d "vit_small" of model/backbones/vit_pytorch.py).
    "vit_small": ViTArch(embed_dim=384, depth=12, num_heads=6),
    "vit_base": ViTArch(embed_dim=768, depth=12, num_heads=12),
}


def list_vit_archs() -> list[str]:
    """Names accepted by :func:`build_vit`."""
    return sorted(VIT_ARCHS)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    return pair  # type: ignore[return-value]


def patch_grid_size(img_size: Sequence[int], patch_size: int, stride_size: int) -> tuple[int, int]:
    """Token grid ``((H - p)//s + 1, (W - p)//s + 1)`` of a (possibly overlapping) patchify conv."""
    height, width = img_size
    if height < patch_size or width < patch_size:
        raise ValueError(
            f"image size {height}x{width} is smaller than the {patch_size}x{patch_size} patch"
        )
    return (height - patch_size) // stride_size + 1, (width - patch_size) // stride_size + 1


# Kept out of torch.compile graphs: compiled, the bicubic resampling is decomposed into arithmetic that honours
# the scale factor everywhere, while the eager kernels special-case an output of the input's size (PyTorch's
# CUDA kernel copies the grid; its CPU backward copies the gradient, so on the CPU that backward is not the
# adjoint of the shifted forward). PASS resamples the 16x8 grid to 16x8 for every global crop, so a compiled
# backbone would train another function than the eager (and published) one.
@torch.compiler.disable
def interpolate_pos_grid(
    pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> Tensor:
    """Resample patch position embeddings ``(1, h*w, D)`` to another grid, as PASS/DINO do.

    Bicubic, ``align_corners=False``, driven by ``scale_factor=((new+0.1)/old)`` per axis (PASS-reID:
    PASS/vision_transformer.py, ``interpolate_pos_encoding``): PyTorch maps output index i to source ``(i + 0.5) / scale - 0.5``, so even
    ``new_grid == old_grid`` gives a slightly shifted, not identical, grid on the CPU (PyTorch's CUDA kernel,
    aten/src/ATen/native/cuda/UpSampleBicubic2d.cu, copies a grid of unchanged size instead).
    """
    old_h, old_w = old_grid
    new_h, new_w = new_grid
    dim = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    # Bicubic upsampling has no CPU kernel for half types; resample in float32 at least.
    compute_dtype = torch.promote_types(pos_embed.dtype, torch.float32)
    grid = F.interpolate(
        grid.to(compute_dtype),
        scale_factor=((new_h + 0.1) / old_h, (new_w + 0.1) / old_w),
        mode="bicubic",
        align_corners=False,
    )
    if tuple(grid.shape[-2:]) != (new_h, new_w):
        raise RuntimeError(
            f"position interpolation produced grid {tuple(grid.shape[-2:])}, expected {new_grid}"
        )
    return grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)


class OverlapPatchEmbed(nn.Module):
    """``Conv2d(3, D, kernel=patch, stride=stride)`` patchify; stride < patch gives overlapping patches."""

    def __init__(self, patch_size: int = 16, stride_size: int = 16, in_chans: int = 3, embed_dim: int = 384):
        super().__init__()
        if stride_size <= 0 or patch_size <= 0:
            raise ValueError(f"patch_size and stride_size must be positive, got {patch_size}, {stride_size}")
        self.patch_size = patch_size
        self.stride_size = stride_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride_size)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid for an input of ``height x width`` pixels."""
        return patch_grid_size((height, width), self.patch_size, self.stride_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Return patch tokens ``(B, h*w, D)`` in raster order and the grid ``(h, w)``."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected images shaped (B, {self.in_chans}, H, W), got {tuple(x.shape)}"
            )
        grid = self.grid_size(x.shape[2], x.shape[3])
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return tokens, grid


class VisionTransformer(nn.Module):
    """Pre-LN ViT (timm ``Block``s, fused attention) with PASS part tokens.

    Args:
        img_size: (H, W) the position embedding is laid out for, e.g. (256, 128) or (384, 128).
        patch_size, stride_size: patchify conv kernel and stride (stride < patch: overlapping patches).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer width/depth.
        drop_path_rate: stochastic depth, rising linearly from 0 to this rate over the blocks.
        num_part_tokens: number of [PART] tokens (PASS: 3; 0: plain [CLS]-only ViT).
        pass_interp_quirk: reproduce the published PASS pre-training behaviour of *always* resampling
            ``pos_embed`` (bicubic, scale ``(h+0.1)/h``), even when the token grid already matches
            (PASS-reID: PASS/vision_transformer.py). Use ``True`` for pre-training fidelity. With ``False``
            (default; what the published fine-tuning code and TransReID-SSL do) positions are added
            unchanged when the grid matches ``pos_grid`` and resampled only when it differs.
        norm_eps: LayerNorm epsilon (1e-6 in all published PASS/DINO/TransReID ViTs).

    Attributes:
        pos_grid: (h, w) token grid that ``pos_embed`` is laid out for.
        num_patches: ``h * w``.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = (256, 128),
        patch_size: int = 16,
        stride_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        num_part_tokens: int = 3,
        pass_interp_quirk: bool = False,
        in_chans: int = 3,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if num_part_tokens < 0:
            raise ValueError(f"num_part_tokens must be >= 0, got {num_part_tokens}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.img_size = _pair(img_size, "img_size")
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.num_part_tokens = num_part_tokens
        self.pass_interp_quirk = pass_interp_quirk

        self.patch_embed = OverlapPatchEmbed(patch_size, stride_size, in_chans, embed_dim)
        self.pos_grid: tuple[int, int] = self.patch_embed.grid_size(*self.img_size)
        self.num_patches = self.pos_grid[0] * self.pos_grid[1]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, embed_dim))
        for index in range(1, num_part_tokens + 1):
            # Separate named parameters (not one tensor) so PASS state dicts load by name.
            setattr(self, f"part_token{index}", nn.Parameter(torch.zeros(1, 1, embed_dim)))
            setattr(self, f"part{index}_pos", nn.Parameter(torch.zeros(1, 1, embed_dim)))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))

        # Linear 0 -> rate over the blocks (plain Python so the model can be built on the meta device).
        drop_path_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=rate,
                norm_layer=norm_layer,
            )
            for rate in drop_path_rates
        )
        self.norm = norm_layer(embed_dim)
        self._init_weights()

    # ------------------------------------------------------------------ init
    def _init_weights(self) -> None:
        """trunc_normal(0.02) for tokens, positions and Linear weights; zero biases; LN (1, 0).

        The patchify conv keeps PyTorch's default init, as in the PASS/DINO pre-training code.
        """
        for param in self.parameters(recurse=False):
            trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------- tokens
    def part_token(self, index: int) -> nn.Parameter:
        """The [PART] token of band ``index`` (0-based): parameter ``part_token{index+1}``."""
        return getattr(self, f"part_token{index + 1}")

    def part_pos(self, index: int) -> nn.Parameter:
        """Position vector of [PART] token ``index`` (0-based): parameter ``part{index+1}_pos``."""
        return getattr(self, f"part{index + 1}_pos")

    def _check_part_index(self, part_index: int | Tensor | None) -> None:
        if part_index is None:
            return
        if self.num_part_tokens == 0:
            raise ValueError("part_index was given, but this ViT has no part tokens (num_part_tokens=0)")
        if isinstance(part_index, Tensor):
            if part_index.ndim != 1 or part_index.dtype != torch.long:
                raise ValueError(f"a per-image part_index must be a 1-D long tensor, got {part_index.dtype} "
                                 f"of shape {tuple(part_index.shape)}")
            return  # its range is checked by the indexing itself (no device sync here)
        if not 0 <= part_index < self.num_part_tokens:
            raise ValueError(
                f"part_index must be in 0..{self.num_part_tokens - 1} or None, got {part_index}"
            )

    def num_leading_tokens(self, part_index: int | Tensor | None = None) -> int:
        """Tokens before the patches: 1 + num_part_tokens (global view), 2 (band view), 1 (plain)."""
        self._check_part_index(part_index)
        return 2 if part_index is not None else 1 + self.num_part_tokens

    def patch_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Patch position embeddings for a token grid, resampled from ``pos_grid`` when needed."""
        if grid == self.pos_grid and not self.pass_interp_quirk:
            return self.pos_embed
        return interpolate_pos_grid(self.pos_embed, self.pos_grid, grid)

    def prepare_tokens(self, x: Tensor, part_index: int | Tensor | None = None) -> Tensor:
        """Embed images and prepend [CLS]/[PART] tokens, positions added: ``(B, T + N, D)``.

        ``part_index``: ``None`` (global view: every [PART] token), ``k`` (band-k views), or a (B,) long
        tensor giving each image its own band (band views of several bands in one pass).
        """
        self._check_part_index(part_index)
        patches, grid = self.patch_embed(x)
        batch = patches.shape[0]
        cls = self.cls_token + self.cls_pos
        if isinstance(part_index, Tensor):
            if part_index.shape[0] != batch:
                raise ValueError(f"part_index has {part_index.shape[0]} entries for {batch} images")
            parts = torch.cat([self.part_token(i) + self.part_pos(i) for i in range(self.num_part_tokens)])
            leading_tokens = torch.cat([cls.expand(batch, -1, -1), parts[part_index]], dim=1)
        else:
            part_indices = range(self.num_part_tokens) if part_index is None else [part_index]
            leading = [cls] + [self.part_token(i) + self.part_pos(i) for i in part_indices]
            leading_tokens = torch.cat(leading, dim=1).expand(batch, -1, -1)
        patches = patches + self.patch_pos_embed(grid)
        return torch.cat([leading_tokens, patches], dim=1)

    # --------------------------------------------------------------- forward
    def forward_until(self, x: Tensor, n_blocks: int, part_index: int | Tensor | None = None) -> Tensor:
        """Tokens after the first ``n_blocks`` blocks, no final LN: ``(B, T + N, D)``.

        ``n_blocks = depth - 1`` is the JPM/TSD "all but the last block" feature; finish with
        ``self.blocks[-1]`` (or a copy of it) and ``self.norm``.
        """
        if not 0 <= n_blocks <= self.depth:
            raise ValueError(f"n_blocks must be in 0..{self.depth}, got {n_blocks}")
        tokens = self.prepare_tokens(x, part_index)
        for block in self.blocks[:n_blocks]:
            tokens = block(tokens)
        return tokens

    def get_intermediate_tokens(
        self, x: Tensor, block_indices: Sequence[int], part_index: int | Tensor | None = None
    ) -> list[Tensor]:
        """Outputs (no final LN) of the blocks at the given 0-based indices, in the order asked.

        One forward pass up to the deepest requested block; e.g. DPM's blocks 2/4/10/12 (1-based)
        are ``block_indices=(1, 3, 9, 11)``.
        """
        indices = [int(i) for i in block_indices]
        if not indices:
            raise ValueError("block_indices is empty")
        bad = [i for i in indices if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range 0..{self.depth - 1}")
        wanted = set(indices)
        outputs: dict[int, Tensor] = {}
        tokens = self.prepare_tokens(x, part_index)
        for i, block in enumerate(self.blocks[: max(indices) + 1]):
            tokens = block(tokens)
            if i in wanted:
                outputs[i] = tokens
        return [outputs[i] for i in indices]

    def forward_tokens(self, x: Tensor, part_index: int | Tensor | None = None) -> Tensor:
        """All tokens after the final LayerNorm: ``(B, T + N, D)``, T from :meth:`num_leading_tokens`."""
        return self.norm(self.forward_until(x, self.depth, part_index))

    def forward(self, x: Tensor, part_index: int | Tensor | None = None) -> Tensor:
        """Final-LN outputs of the leading tokens ``(B, T, D)``: [CLS, P1..PK] (global view),
        [CLS, P(k+1)] (``part_index=k``, or row by row for a tensor), [CLS] (no part tokens)."""
        tokens = self.forward_tokens(x, part_index)
        return tokens[:, : self.num_leading_tokens(part_index)]

    def attention_probabilities(self, block_index: int, tokens: Tensor) -> Tensor:
        """Attention weights ``softmax(QK^T / sqrt(d))`` of block ``block_index`` for its input tokens.

        ``tokens`` is the block's *input* (e.g. ``forward_until(x, block_index)``); returns
        ``(B, heads, L, L)``. The fused attention kernel used in forward never materialises these,
        so this recomputes them (e.g. for DPM's CLS-to-patch prototypes or visualisation).
        """
        return self.attention_logits(block_index, tokens).softmax(dim=-1)

    def attention_logits(self, block_index: int, tokens: Tensor, num_queries: int | None = None) -> Tensor:
        """Attention logits ``QK^T / sqrt(d)`` (before the softmax) of block ``block_index``.

        ``tokens`` is the block's input; returns ``(B, heads, num_queries, L)`` for the first
        ``num_queries`` query tokens (default all ``L``), e.g. ``num_queries=1`` gives the [CLS] row that
        DPM's orthogonality loss uses.
        """
        if not 0 <= block_index < self.depth:
            raise ValueError(f"block_index must be in 0..{self.depth - 1}, got {block_index}")
        block = self.blocks[block_index]
        attn = block.attn
        batch, length, _ = tokens.shape
        rows = length if num_queries is None else num_queries
        if not 1 <= rows <= length:
            raise ValueError(f"num_queries must be in 1..{length}, got {num_queries}")
        qkv = attn.qkv(block.norm1(tokens))
        qkv = qkv.reshape(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        query, key = attn.q_norm(qkv[0][:, :, :rows]), attn.k_norm(qkv[1])
        return query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])


def build_vit(arch: str, **kwargs) -> VisionTransformer:
    """Build a named ViT (``vit_tiny``, ``vit_small``, ``vit_base``); kwargs override any field.

    Example: ``build_vit("vit_small", img_size=(384, 128), stride_size=12, drop_path_rate=0.1)``.
    """
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown ViT arch {arch!r}; expected one of {list_vit_archs()}")
    spec = VIT_ARCHS[arch]
    options = dict(
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=spec.qkv_bias,
    )
    options.update(kwargs)
    return VisionTransformer(**options)
