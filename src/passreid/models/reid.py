"""Re-ID model for fine-tuning: the passreid ViT, BNNeck heads, optional SIE and JPM.

Necks and test features as PASS-reID: PASS_transreid/model/make_model.py (``build_transformer_pass``) and
TransReID: model/make_model.py (BNNeck, JPM's ``build_transformer_local``); SIE as TransReID:
model/backbones/vit_pytorch.py. Module names, used by the
published-checkpoint mapping (:mod:`passreid.finetune.checkpoints`):

* ``backbone``: :class:`passreid.models.VisionTransformer`;
* ``head``: :class:`TokenHead` — ``head.necks.0`` the [CLS] BN, ``head.necks.k`` the BN of part token k
  (PASS multi-neck), ``head.classifier``;
* ``sie_embed``: ``(num_cameras, 1, D)`` camera embeddings (SIE);
* ``jpm``: :class:`JigsawBranches` — ``jpm.block``/``jpm.norm`` (copies of the last block and the final
  LN, TransReID's ``b2``) and ``jpm.heads.i``. TransReID's global copy ``b1`` is the backbone's own last
  block and final LN, which JPM leaves otherwise unused.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from passreid.losses.reid import ReIDTrainOutput
from passreid.models import VisionTransformer

__all__ = [
    "HeadOutput",
    "JigsawBranches",
    "ReIDModel",
    "TokenHead",
    "jigsaw_rearrange",
    "make_bnneck",
    "make_classifier",
    "split_equal_chunks",
]


def _tracing_a_graph() -> bool:
    """True while torch.export / torch.compile traces the model (fake tensors: their values are unknown)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling is not None and is_compiling())


def make_bnneck(dim: int) -> nn.BatchNorm1d:
    """BatchNorm1d with weight 1, bias 0 and the bias frozen (``requires_grad=False``), as BNNeck."""
    bn = nn.BatchNorm1d(dim)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)
    return bn


def make_classifier(dim: int, num_classes: int) -> nn.Linear:
    """Bias-free identity classifier with weights drawn from N(0, 0.001²)."""
    classifier = nn.Linear(dim, num_classes, bias=False)
    nn.init.normal_(classifier.weight, std=0.001)
    return classifier


@dataclass
class HeadOutput:
    """A head's feature before its BN neck(s) (triplet loss, default test feature) and after (classifier)."""

    before: Tensor
    after: Tensor


class TokenHead(nn.Module):
    """BNNeck head over the leading tokens ``(B, T, D)`` of the ViT.

    ``num_parts=0``: the plain [CLS] head, ``before = CLS``, ``after = BN(CLS)``.
    ``num_parts=K > 0`` (PASS): with ``P = mean_k(part_k)``,
    ``fusion="cat"``: ``before = cat(CLS, P)`` (2D); ``fusion="mean"``: ``before = (CLS + P) / 2`` (D).
    Multi-neck (default) normalises every token with its own BN and fuses the BN outputs the same way;
    single-neck applies one BN to ``before``. The classifier sees ``after``. ``normalize_necks``
    L2-normalises each BN output before the fusion (PASS Cluster Contrast's feature, whose single-neck
    form is ``normalize(BN(before))`` and multi-neck form a fusion of unit vectors).
    """

    def __init__(self, dim: int, num_classes: int, num_parts: int = 0, fusion: str = "cat",
                 multi_neck: bool = True, normalize_necks: bool = False) -> None:
        super().__init__()
        if fusion not in ("cat", "mean"):
            raise ValueError(f"feature fusion must be 'cat' or 'mean', got {fusion!r}")
        if num_parts < 0 or num_classes < 1:
            raise ValueError(f"need num_parts >= 0 and num_classes >= 1, got {num_parts}, {num_classes}")
        self.dim = dim
        self.num_parts = num_parts
        self.fusion = fusion
        self.multi_neck = multi_neck or num_parts == 0
        self.normalize_necks = normalize_necks
        self.feature_dim = 2 * dim if (num_parts > 0 and fusion == "cat") else dim
        if self.multi_neck:
            self.necks = nn.ModuleList(make_bnneck(dim) for _ in range(1 + num_parts))
        else:
            self.necks = nn.ModuleList([make_bnneck(self.feature_dim)])
        self.classifier = make_classifier(self.feature_dim, num_classes)

    def _neck(self, index: int, x: Tensor) -> Tensor:
        out = self.necks[index](x)
        return nn.functional.normalize(out, dim=1) if self.normalize_necks else out

    def _fuse(self, cls: Tensor, parts: Tensor) -> Tensor:
        if self.fusion == "cat":
            return torch.cat([cls, parts], dim=1)
        return (cls + parts) / 2

    def forward(self, tokens: Tensor) -> HeadOutput:
        """``tokens``: (B, T, D) with T >= 1 + num_parts; tokens beyond those are ignored."""
        if tokens.ndim != 3 or tokens.shape[1] < 1 + self.num_parts:
            raise ValueError(
                f"head expects (B, >= {1 + self.num_parts}, D) leading tokens, got {tuple(tokens.shape)}"
            )
        cls = tokens[:, 0]
        if self.num_parts == 0:
            return HeadOutput(cls, self._neck(0, cls))
        parts = tokens[:, 1 : 1 + self.num_parts]
        before = self._fuse(cls, parts.mean(dim=1))
        if not self.multi_neck:
            return HeadOutput(before, self._neck(0, before))
        part_bn = torch.stack([self._neck(k + 1, parts[:, k]) for k in range(self.num_parts)], dim=1)
        after = self._fuse(self._neck(0, cls), part_bn.mean(dim=1))
        return HeadOutput(before, after)


def jigsaw_rearrange(patches: Tensor, shift: int, groups: int) -> Tensor:
    """JPM shift and patch shuffle of patch tokens ``(B, N, D)`` (TransReID ``shuffle_unit``).

    Shift: the first ``shift - 1`` patches move to the end (sequence ``shift-1, ..., N-1, 0, ..., shift-2``).
    Shuffle: view the shifted sequence as ``groups`` rows of ``M / groups`` and read it column by
    column, i.e. output position ``j * groups + g`` takes shifted position ``g * (M / groups) + j``.
    ``M = N``, or, when ``groups`` does not divide ``N``, the shifted sequence is first padded with copies of
    its second-to-last token up to a multiple of ``groups`` (TransReID pads that one token for 2 groups).
    """
    num_patches = patches.shape[1]
    if not 1 <= shift <= num_patches:
        raise ValueError(f"JPM shift must be in 1..{num_patches}, got {shift}")
    shifted = torch.cat([patches[:, shift - 1 :], patches[:, : shift - 1]], dim=1)
    pad = (-num_patches) % groups
    if pad:
        shifted = torch.cat([shifted, shifted[:, -2:-1].expand(-1, pad, -1)], dim=1)
    batch, length, dim = shifted.shape
    return shifted.reshape(batch, groups, length // groups, dim).transpose(1, 2).reshape(batch, -1, dim)


def split_equal_chunks(tokens: Tensor, num_chunks: int, num_tokens: int | None = None) -> list[Tensor]:
    """``num_chunks`` consecutive chunks of ``num_tokens // num_chunks`` tokens (default ``num_tokens``: all of
    them); the remainder is dropped, as published."""
    length = (tokens.shape[1] if num_tokens is None else num_tokens) // num_chunks
    if length == 0:
        raise ValueError(f"cannot split {tokens.shape[1]} tokens into {num_chunks} non-empty chunks")
    return [tokens[:, i * length : (i + 1) * length] for i in range(num_chunks)]


class JigsawBranches(nn.Module):
    """TransReID's local branches: rearranged patch chunks, each with the [CLS] token, through a shared
    copy of the last block + final LN; each chunk's [CLS] output gets its own BNNeck head."""

    def __init__(self, last_block: nn.Module, final_norm: nn.Module, dim: int, num_classes: int,
                 num_branches: int = 4, shift: int = 5, groups: int = 2, rearrange: bool = True) -> None:
        super().__init__()
        self.block = copy.deepcopy(last_block)
        self.norm = copy.deepcopy(final_norm)
        self.heads = nn.ModuleList(TokenHead(dim, num_classes) for _ in range(num_branches))
        self.num_branches = num_branches
        self.shift = shift
        self.groups = groups
        self.rearrange = rearrange

    def chunks(self, patches: Tensor) -> list[Tensor]:
        """The patch-token chunks that the branches see (after the optional shift + shuffle)."""
        num_patches = patches.shape[1]  # the chunk length ignores a shuffle's padding token, as published
        if self.rearrange:
            patches = jigsaw_rearrange(patches, self.shift, self.groups)
        return split_equal_chunks(patches, self.num_branches, num_patches)

    def forward(self, cls_token: Tensor, patches: Tensor) -> list[HeadOutput]:
        """``cls_token`` (B, 1, D) and ``patches`` (B, N, D) from the input of the last block."""
        outputs = []
        for chunk, head in zip(self.chunks(patches), self.heads):
            tokens = self.norm(self.block(torch.cat([cls_token, chunk], dim=1)))
            outputs.append(head(tokens[:, :1]))
        return outputs


class ReIDModel(nn.Module):
    """ViT backbone + BNNeck head, with optional SIE (camera embedding) and JPM branches.

    ``forward(images, camids=None)``: in training mode a :class:`ReIDTrainOutput` (global branch
    weight 1, or 0.5 global + 0.5 mean of the JPM branches); in eval mode the test feature
    ``(B, feature_dim)``: the head's pre-BN feature (``neck_feat="before"``) or post-BN one, with
    JPM ``cat(g, l_1/n, ..., l_n/n)``. SIE models need ``camids`` in both modes.

    Build the JPM model *after* loading pretrained weights into the backbone: its branch is a copy
    of the last block as it is at construction time (as in TransReID).
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        num_classes: int,
        *,
        head: str = "pass",
        feat_fusion: str = "cat",
        multi_neck: bool = True,
        normalize_necks: bool = False,
        neck_feat: str = "before",
        num_cameras: int = 0,
        sie_coe: float = 3.0,
        jpm: bool = False,
        jpm_num_branches: int = 4,
        jpm_shift: int = 5,
        jpm_shuffle_groups: int = 2,
        jpm_rearrange: bool = True,
    ) -> None:
        super().__init__()
        if head not in ("pass", "cls"):
            raise ValueError(f"head must be 'pass' or 'cls', got {head!r}")
        if head == "pass" and backbone.num_part_tokens == 0:
            raise ValueError("the PASS head needs a backbone with part tokens (num_part_tokens > 0)")
        if neck_feat not in ("before", "after"):
            raise ValueError(f"neck_feat must be 'before' or 'after', got {neck_feat!r}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.neck_feat = neck_feat
        self.head_type = head
        dim = backbone.embed_dim
        num_parts = backbone.num_part_tokens if head == "pass" else 0
        self.head = TokenHead(dim, num_classes, num_parts, feat_fusion, multi_neck, normalize_necks)
        self.num_cameras = num_cameras
        self.sie_coe = sie_coe
        if num_cameras > 0:
            self.sie_embed = nn.Parameter(torch.zeros(num_cameras, 1, dim))
            trunc_normal_(self.sie_embed, std=0.02)
        else:
            self.register_parameter("sie_embed", None)
        self.jpm = None
        if jpm:
            self.jpm = JigsawBranches(backbone.blocks[-1], backbone.norm, dim, num_classes, jpm_num_branches,
                                      jpm_shift, jpm_shuffle_groups, jpm_rearrange)

    @property
    def feature_dim(self) -> int:
        """Width of the test feature."""
        extra = self.jpm.num_branches * self.backbone.embed_dim if self.jpm is not None else 0
        return self.head.feature_dim + extra

    def camera_embedding(self, camids: Tensor | None) -> Tensor:
        """``sie_coe * sie_embed[camids]``: (B, 1, D), added to every token after the positions."""
        if camids is None:
            raise ValueError("this model uses SIE (model.sie_camera): pass the images' camera ids (camids)")
        camids = torch.as_tensor(camids, device=self.sie_embed.device).long()
        # A graph traced by torch.export cannot hold this data-dependent check (nor raise a Python error).
        checkable = camids.numel() and not _tracing_a_graph()
        if checkable and (int(camids.min()) < 0 or int(camids.max()) >= self.num_cameras):
            raise ValueError(
                f"camera ids must be in 0..{self.num_cameras - 1} (the training cameras the SIE was built "
                f"for), got {sorted(set(camids.tolist()))}; SIE cannot embed unseen cameras"
            )
        return self.sie_coe * self.sie_embed[camids]

    def encode(self, images: Tensor, n_blocks: int, camids: Tensor | None = None) -> Tensor:
        """All tokens after the first ``n_blocks`` blocks (no final LN), SIE added to the input tokens."""
        if self.sie_embed is None:
            return self.backbone.forward_until(images, n_blocks)
        tokens = self.backbone.prepare_tokens(images) + self.camera_embedding(camids)
        for block in self.backbone.blocks[:n_blocks]:
            tokens = block(tokens)
        return tokens

    def branch_outputs(self, images: Tensor, camids: Tensor | None = None) -> list[HeadOutput]:
        """Head outputs of the global branch, then of every JPM branch."""
        num_leading = self.backbone.num_leading_tokens()
        depth = self.backbone.depth
        if self.jpm is None:
            tokens = self.backbone.norm(self.encode(images, depth, camids))
            return [self.head(tokens[:, :num_leading])]
        features = self.encode(images, depth - 1, camids)
        global_tokens = self.backbone.norm(self.backbone.blocks[-1](features))
        outputs = [self.head(global_tokens[:, :num_leading])]
        return outputs + self.jpm(features[:, :1], features[:, num_leading:])

    def forward(self, images: Tensor, camids: Tensor | None = None) -> ReIDTrainOutput | Tensor:
        outputs = self.branch_outputs(images, camids)
        if self.training:
            heads = [self.head] + (list(self.jpm.heads) if self.jpm is not None else [])
            logits = [head.classifier(out.after) for head, out in zip(heads, outputs)]
            feats = [out.before for out in outputs]
            if self.jpm is None:
                weights = [1.0]
            else:
                weights = [0.5] + [0.5 / self.jpm.num_branches] * self.jpm.num_branches
            return ReIDTrainOutput(logits=logits, feats=feats, weights=weights)
        chosen = [out.before if self.neck_feat == "before" else out.after for out in outputs]
        if len(chosen) == 1:
            return chosen[0]
        scale = 1.0 / (len(chosen) - 1)
        return torch.cat([chosen[0]] + [local * scale for local in chosen[1:]], dim=1)
