"""DPM, Dynamic Prototype Mask (Tan et al., ACM MM 2022), as the fine-tuning method ``method: dpm``.

Follows the official code (DPM, stone96123/DPM: model/backbones/vit_pytorch.py, model/make_model.py,
loss/make_loss.py, processor/processor.py, utils/metrics.py). On the TransReID-style ViT
(plain [CLS] head, optional camera SIE, no JPM):

* **Hierarchical mask generator** (:class:`HierarchicalMaskGenerator`): the patch tokens after the blocks
  ``dpm.mask_blocks`` (1-based; published 2, 4, 10, 12, the last one before the final LN) are laid out
  on the token grid and concatenated (``n·D`` channels), then conv3x3(n·D→2D)+BN+ReLU, maxpool 2,
  conv3x3(2D→D)+BN+ReLU, maxpool 2, conv3x3(D→D)+BN+ReLU, global max-pool, ``Linear(D, D)`` with zero
  weight and bias, sigmoid: a per-image channel mask ``m ∈ (0, 1)^D``, 0.5 everywhere at init.
  ViT-B gives the published 3072/1536/768 channels. The grid is the model's real token grid
  ``((H-16)//s+1, (W-16)//s+1)``; the published code derives it as ``W = int(sqrt(N/2)), H = N/W``
  (it assumes H = 2W), which gives the same grid for 256x128 at strides 11, 12 and 16.
* **Masked ArcFace** (:func:`masked_prototype_cosine`, :func:`arcface_logits`): one classifier weight
  ``W`` (C x D, Xavier-uniform) gives plain logits ``W f`` on the BN feature ``f`` and masked cosines
  ``cos_ij = <f̂_i, normalize(m_i ⊙ Ŵ_j)>`` (each image's mask applied to every class prototype), with
  the ArcFace margin on the target class (``s = dpm.arc_scale``, ``m = dpm.arc_margin``, easy_margin off).
* **Orthogonality loss** (:func:`orthogonality_loss`) on the last block's [CLS]-to-patch attention
  logits, one row per head. As in the official code these are the scaled ``q·k`` values *before* the
  softmax (``attn[:, :, 0, 1:]`` taken ahead of ``softmax``).
* **Loss** (:class:`DPMCriterion`): ``id_weight · (0.5 CE(plain) + 0.5 CE(arc) + dpm.orth_weight · L_orth)
  + triplet_weight · T(pre-BN [CLS])`` with the configured (soft-margin) batch-hard triplet.
* **Two optimisers**: the trainer's main optimizer and schedule step everything except the mask
  generator; a second pass per iteration recomputes forward and loss and steps only the mask generator
  with SGD (lr ``dpm.mask_lr`` or ``optim.lr``, biases x ``optim.bias_lr_factor``, weight decay
  ``optim.weight_decay_bias``, momentum ``optim.momentum``, no schedule): :func:`build_mask_generator_pass`.
* **Test distance** (:class:`QueryMaskedDistance`): the eval forward returns ``[feature, mask]`` rows
  (feature = pre-BN [CLS] with ``model.neck_feat: before``); ``d(q, g) = arccos(clip(<f̂_q,
  normalize(m_q ⊙ f̂_g)>, -1+1e-5, 1-1e-5))``: the query's mask on every gallery feature, the gallery
  mask unused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from passreid.config import ConfigError
from passreid.engine import unwrap_model
from passreid.engine.optim import build_param_groups
from passreid.eval.distance import as_feature_tensor, resolve_device
from passreid.eval.features import ExtractedFeatures
from passreid.finetune.methods import FinetuneMethod, SecondPass, register_method
from passreid.losses.reid import batch_hard_triplet_loss, identity_loss
from passreid.models import VisionTransformer
from passreid.models.factory import build_backbone, load_backbone_weights
from passreid.models.reid import ReIDModel

if TYPE_CHECKING:  # annotations only: passreid.finetune.config imports this module for its section
    from passreid.finetune.config import FinetuneConfig

__all__ = [
    "DPMConfig",
    "DPMCriterion",
    "DPMModel",
    "DPMTrainOutput",
    "HierarchicalMaskGenerator",
    "QueryMaskedDistance",
    "arcface_logits",
    "build_mask_generator_pass",
    "masked_prototype_cosine",
    "orthogonality_loss",
    "query_masked_distance",
]


@dataclass
class DPMConfig:
    """Dynamic Prototype Mask (``method: dpm``; DPM: configs/OCC_Duke/dpm.yml). Unused by other methods."""

    mask_blocks: list[int] = field(default_factory=lambda: [2, 4, 10, 12])  # 1-based blocks feeding the mask generator
    orth_weight: float = 0.1  # weight of the orthogonality loss (0.01 for the Occluded-REID recipe)
    arc_scale: float = 30.0  # masked ArcFace s
    arc_margin: float = 0.5  # masked ArcFace m (0.3 in DPM's Market-1501 config, i.e. for Occluded-REID)
    mask_lr: float = 0.0  # SGD lr of the mask generator's own optimizer (biases x optim.bias_lr_factor); 0 = optim.lr


_NORM_EPS = 1e-12  # F.normalize's guard
_ORTH_EPS = 1e-6  # the official row normalisation: a / sqrt(||a||² + 1e-6)
_ARCCOS_CLIP = 1e-5  # the official test distance clips the similarity to [-1 + 1e-5, 1 - 1e-5]
MASK_GENERATOR = "mask_generator"  # module name; its parameters form the second pass


# ------------------------------------------------------------------------------------------ model


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class HierarchicalMaskGenerator(nn.Module):
    """``n`` token maps ``(B, D, h, w)`` -> per-image channel mask ``(B, D)`` in (0, 1) (module docstring).

    The convolutions keep PyTorch's default initialisation (as published); the final Linear starts at
    zero, so every mask is 0.5 until the generator learns.
    """

    def __init__(self, dim: int, num_levels: int) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"the mask generator needs at least one token map, got {num_levels}")
        self.dim = dim
        self.num_levels = num_levels
        self.convs = nn.Sequential(
            _conv_bn_relu(num_levels * dim, 2 * dim), nn.MaxPool2d(kernel_size=2, stride=2),
            _conv_bn_relu(2 * dim, dim), nn.MaxPool2d(kernel_size=2, stride=2),
            _conv_bn_relu(dim, dim), nn.AdaptiveMaxPool2d(1),
        )
        self.fc = nn.Linear(dim, dim)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, token_maps: list[Tensor]) -> Tensor:
        if len(token_maps) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} token maps, got {len(token_maps)}")
        pooled = self.convs(torch.cat(token_maps, dim=1)).flatten(1)
        return torch.sigmoid(self.fc(pooled))


@dataclass
class DPMTrainOutput:
    """DPM's training forward: plain logits ``W f`` (B, C), masked cosines (B, C) (margin not yet applied:
    it needs the labels), the pre-BN [CLS] feature (B, D), the mask (B, D) and the last block's [CLS]-to-patch
    attention logits (B, heads, N)."""

    logits: Tensor
    masked_cosine: Tensor
    feat: Tensor
    mask: Tensor
    orth_maps: Tensor


class DPMModel(ReIDModel):
    """ViT + [CLS] BNNeck (``head``, classifier shared by both logits) + hierarchical mask generator, optional SIE.

    ``forward(images, camids=None)``: training mode -> :class:`DPMTrainOutput`; eval mode -> ``(B, 2D)``
    rows ``[test feature, mask]`` for :class:`QueryMaskedDistance`.
    """

    def __init__(self, backbone: VisionTransformer, num_classes: int, *, mask_blocks: tuple[int, ...],
                 neck_feat: str = "before", num_cameras: int = 0, sie_coe: float = 3.0) -> None:
        super().__init__(backbone, num_classes, head="cls", neck_feat=neck_feat, num_cameras=num_cameras,
                         sie_coe=sie_coe)
        nn.init.xavier_uniform_(self.head.classifier.weight)  # DPM's MArcface weight init
        bad = [b for b in mask_blocks if not 0 <= b < backbone.depth]
        if not mask_blocks or bad:
            raise ValueError(f"dpm.mask_blocks must be 1-based block numbers in 1..{backbone.depth} for this "
                             f"{backbone.depth}-block ViT, got {[b + 1 for b in mask_blocks]}")
        grid_h, grid_w = backbone.pos_grid
        if grid_h < 4 or grid_w < 4:
            raise ValueError(f"DPM's mask generator max-pools the token grid twice by 2, so it needs a grid of at "
                             f"least 4x4 tokens; img_size {backbone.img_size} with stride "
                             f"{backbone.patch_embed.stride_size} gives {grid_h}x{grid_w}")
        self.mask_blocks = tuple(int(b) for b in mask_blocks)
        self.mask_generator = HierarchicalMaskGenerator(backbone.embed_dim, len(self.mask_blocks))

    @property
    def feature_dim(self) -> int:
        """Width of an eval-forward row: the test feature and the mask."""
        return 2 * self.backbone.embed_dim

    def _token_map(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        patches = tokens[:, self.backbone.num_leading_tokens():]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)

    def encode_with_mask(self, images: Tensor, camids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(final-LN tokens, mask (B, D), last block's [CLS]-to-patch attention logits (B, heads, N))``."""
        backbone = self.backbone
        grid = backbone.patch_embed.grid_size(images.shape[2], images.shape[3])
        tokens = backbone.prepare_tokens(images)
        if self.sie_embed is not None:
            tokens = tokens + self.camera_embedding(camids)
        maps: dict[int, Tensor] = {}
        last_input = tokens
        for index, block in enumerate(backbone.blocks):
            if index == backbone.depth - 1:
                last_input = tokens
            tokens = block(tokens)
            if index in self.mask_blocks:
                maps[index] = self._token_map(tokens, grid)
        mask = self.mask_generator([maps[b] for b in self.mask_blocks])
        cls_logits = backbone.attention_logits(backbone.depth - 1, last_input, num_queries=1)[:, :, 0]
        orth_maps = cls_logits[:, :, backbone.num_leading_tokens():]
        return backbone.norm(tokens), mask, orth_maps

    def forward(self, images: Tensor, camids: Tensor | None = None) -> DPMTrainOutput | Tensor:
        tokens, mask, orth_maps = self.encode_with_mask(images, camids)
        out = self.head(tokens[:, :1])
        if not self.training:
            feature = out.before if self.neck_feat == "before" else out.after
            return torch.cat([feature, mask.to(feature.dtype)], dim=1)
        weight = self.head.classifier.weight
        logits = F.linear(out.after, weight)
        cosine = masked_prototype_cosine(out.after.float(), mask.float(), weight.float())
        return DPMTrainOutput(logits=logits, masked_cosine=cosine, feat=out.before, mask=mask, orth_maps=orth_maps)


# ----------------------------------------------------------------------------------------- losses


def _masked_cosine_of_unit(query_unit: Tensor, masks: Tensor, proto_unit: Tensor, proto_unit_sq: Tensor) -> Tensor:
    """``<q̂_i, m_i ⊙ p̂_j> / ||m_i ⊙ p̂_j||`` as two matmuls (no (rows, cols, D) tensor)."""
    numerator = (query_unit * masks) @ proto_unit.t()
    norms = ((masks * masks) @ proto_unit_sq.t()).clamp_min(0.0).sqrt()
    return numerator / norms.clamp_min(_NORM_EPS)


def masked_prototype_cosine(feats: Tensor, masks: Tensor, prototypes: Tensor) -> Tensor:
    """``cos_ij = <normalize(f_i), normalize(m_i ⊙ normalize(p_j))>``: (B, D), (B, D), (C, D) -> (B, C).

    Row ``i``'s mask weights every prototype ``j`` (DPM's masked class prototypes; with gallery features
    as prototypes, its test similarity).
    """
    proto_unit = F.normalize(prototypes, dim=1, eps=_NORM_EPS)
    return _masked_cosine_of_unit(F.normalize(feats, dim=1, eps=_NORM_EPS), masks, proto_unit, proto_unit * proto_unit)


def arcface_logits(cosine: Tensor, targets: Tensor, scale: float = 30.0, margin: float = 0.5) -> Tensor:
    """ArcFace logits ``s · cos θ`` with the target class at ``s · cos(θ + m)`` (easy_margin off).

    Where ``θ + m`` would pass π (``cos θ <= cos(π − m)``) the target gets ``cos θ − m · sin(π − m)``
    instead, which keeps the logit decreasing in θ.
    """
    cosine = cosine.float()
    sine = (1.0 - cosine * cosine).clamp_min(1e-9).sqrt()  # clamp: no infinite gradient at |cos| = 1
    with_margin = cosine * math.cos(margin) - sine * math.sin(margin)
    with_margin = torch.where(cosine > math.cos(math.pi - margin), with_margin,
                              cosine - math.sin(math.pi - margin) * margin)
    is_target = F.one_hot(targets.long(), cosine.shape[1]).bool()
    return scale * torch.where(is_target, with_margin, cosine)


def orthogonality_loss(maps: Tensor) -> Tensor:
    """``Σ_b ||Â_b Â_bᵀ − I||_F² / K²`` for maps ``(B, K, N)``, ``Â`` = rows over ``sqrt(||row||² + 1e-6)``."""
    if maps.ndim != 3:
        raise ValueError(f"orthogonality loss expects (B, K, N) maps, got {tuple(maps.shape)}")
    maps = maps.float()
    unit = maps / (maps.pow(2).sum(dim=2, keepdim=True) + _ORTH_EPS).sqrt()
    gram = unit @ unit.transpose(1, 2)
    num_maps = maps.shape[1]
    eye = torch.eye(num_maps, device=maps.device, dtype=gram.dtype)
    return (gram - eye).pow(2).sum() / (num_maps * num_maps)


class DPMCriterion(nn.Module):
    """DPM's loss (module docstring). ``forward`` returns ``loss`` (total), ``id`` (0.5 CE plain + 0.5 CE arc),
    ``id_plain``, ``id_arc``, ``orth`` (unweighted L_orth), ``triplet`` and ``acc`` (plain logits, no grad)."""

    def __init__(self, *, id_weight: float = 1.0, triplet_weight: float = 1.0, orth_weight: float = 0.1,
                 arc_scale: float = 30.0, arc_margin: float = 0.5, label_smoothing: float = 0.0,
                 triplet_margin: float | None = None) -> None:
        super().__init__()
        self.id_weight, self.triplet_weight, self.orth_weight = id_weight, triplet_weight, orth_weight
        self.arc_scale, self.arc_margin = arc_scale, arc_margin
        self.label_smoothing = label_smoothing
        self.triplet_margin = triplet_margin

    def forward(self, output: DPMTrainOutput, targets: Tensor) -> dict[str, Tensor]:
        arc = arcface_logits(output.masked_cosine, targets, self.arc_scale, self.arc_margin)
        id_plain = identity_loss(output.logits, targets, self.label_smoothing)
        id_arc = identity_loss(arc, targets, self.label_smoothing)
        orth = orthogonality_loss(output.orth_maps)
        id_term = 0.5 * id_plain + 0.5 * id_arc
        triplet = batch_hard_triplet_loss(output.feat, targets, self.triplet_margin)
        total = self.id_weight * (id_term + self.orth_weight * orth) + self.triplet_weight * triplet
        with torch.no_grad():
            accuracy = (output.logits.argmax(dim=1) == targets).float().mean()
        return {"loss": total, "id": id_term, "id_plain": id_plain, "id_arc": id_arc, "orth": orth,
                "triplet": triplet, "acc": accuracy}


# ------------------------------------------------------------------------------------ test distance


class QueryMaskedDistance:
    """Chunk function ``fn(q_start, q_end) -> (rows, G)`` of DPM's test distance (module docstring).

    ``query_rows`` / ``gallery_rows`` are eval-forward rows ``[feature (D), mask (D)]``. Memory: the
    normalised gallery and its square (G x D each) plus O(rows x G) per call; the masked gallery
    ``m_q ⊙ f̂_g`` is never materialised.
    """

    output_is_finite = True  # arccos of a clipped cosine of validated finite inputs

    def __init__(self, query_rows: Tensor | np.ndarray, gallery_rows: Tensor | np.ndarray,
                 device: str | torch.device | None = None) -> None:
        query = as_feature_tensor(query_rows, "DPM query rows [feature, mask]")
        gallery = as_feature_tensor(gallery_rows, "DPM gallery rows [feature, mask]")
        if query.shape[1] != gallery.shape[1] or query.shape[1] % 2:
            raise ValueError(f"DPM rows must be [feature (D), mask (D)] with the same D for query and gallery, got "
                             f"widths {query.shape[1]} and {gallery.shape[1]}")
        self.device = resolve_device(device)
        dim = query.shape[1] // 2
        query = query.to(self.device)
        self.query_unit = F.normalize(query[:, :dim], dim=1, eps=_NORM_EPS)
        self.query_mask = query[:, dim:]
        self.gallery_unit = F.normalize(gallery[:, :dim].to(self.device), dim=1, eps=_NORM_EPS)
        self.gallery_unit_sq = self.gallery_unit * self.gallery_unit

    @property
    def num_query(self) -> int:
        return self.query_unit.shape[0]

    @property
    def num_gallery(self) -> int:
        return self.gallery_unit.shape[0]

    def __call__(self, q_start: int, q_end: int) -> Tensor:
        similarity = _masked_cosine_of_unit(self.query_unit[q_start:q_end], self.query_mask[q_start:q_end],
                                            self.gallery_unit, self.gallery_unit_sq)
        return similarity.clamp_(-1.0 + _ARCCOS_CLIP, 1.0 - _ARCCOS_CLIP).arccos_()


def query_masked_distance(query_rows: Tensor | np.ndarray, gallery_rows: Tensor | np.ndarray,
                          device: str | torch.device | None = None) -> Tensor:
    """The full ``(Q, G)`` DPM test distance (small problems and tests; evaluation uses the chunk function)."""
    fn = QueryMaskedDistance(query_rows, gallery_rows, device)
    return fn(0, fn.num_query)


# --------------------------------------------------------------------------------------- the method


def build_dpm_model(cfg: FinetuneConfig, num_classes: int, num_cameras: int, load_weights: bool = True) -> DPMModel:
    """DPM on the ViT of ``cfg.model`` (plain [CLS] head; SIE when ``model.sie_camera``; JPM not supported)."""
    model = cfg.model
    if model.jpm:
        raise ValueError("method dpm runs without JPM (the published DPM model has no JPM branch): set model.jpm=false")
    if model.head != "cls":
        raise ValueError("method dpm uses the plain [CLS] head: set model.head=cls (and num_part_tokens: 0 for the "
                         "published TransReID layout)")
    if model.sie_camera and num_cameras < 1:
        raise ValueError("model.sie_camera is set but the training set has no camera ids")
    backbone = build_backbone(cfg.model)
    if load_weights:
        load_backbone_weights(backbone, cfg.model)
    return DPMModel(backbone, num_classes, mask_blocks=tuple(b - 1 for b in cfg.dpm.mask_blocks),
                    neck_feat=model.neck_feat, num_cameras=num_cameras if model.sie_camera else 0,
                    sie_coe=model.sie_coe)


def build_dpm_criterion(cfg: FinetuneConfig) -> DPMCriterion:
    """:class:`DPMCriterion` with the weights of ``cfg.loss`` and ``cfg.dpm``."""
    loss, dpm = cfg.loss, cfg.dpm
    if dpm.orth_weight < 0 or dpm.arc_scale <= 0 or not 0 <= dpm.arc_margin < math.pi / 2 or dpm.mask_lr < 0:
        raise ConfigError(f"config section 'dpm': need orth_weight >= 0, arc_scale > 0, 0 <= arc_margin < pi/2 and "
                          f"mask_lr >= 0, got {dpm}")
    return DPMCriterion(id_weight=loss.id_weight, triplet_weight=loss.triplet_weight, orth_weight=dpm.orth_weight,
                        arc_scale=dpm.arc_scale, arc_margin=dpm.arc_margin, label_smoothing=loss.label_smoothing,
                        triplet_margin=None if loss.triplet == "soft_margin" else loss.margin)


def build_mask_generator_pass(model: nn.Module, cfg: FinetuneConfig) -> SecondPass:
    """The mask generator's own SGD optimizer (published ``Moptimizer``): lr ``dpm.mask_lr`` (0: ``optim.lr``),
    biases x ``optim.bias_lr_factor``, weight decay ``optim.weight_decay_bias`` for all, momentum
    ``optim.momentum``, no schedule."""
    generator = getattr(unwrap_model(model), MASK_GENERATOR)
    optim = cfg.optim
    lr = cfg.dpm.mask_lr or optim.lr
    groups = build_param_groups(generator, lr, optim.weight_decay_bias, optim.weight_decay_bias, optim.bias_lr_factor)
    names = frozenset(f"{MASK_GENERATOR}.{name}" for name, _ in generator.named_parameters())
    return SecondPass(names=names, optimizer=torch.optim.SGD(groups, lr=lr, momentum=optim.momentum))


def build_dpm_test_distance(cfg: FinetuneConfig, query: ExtractedFeatures, gallery: ExtractedFeatures,
                            device: torch.device | None) -> QueryMaskedDistance:
    """:class:`QueryMaskedDistance` over the eval-forward rows of both splits."""
    return QueryMaskedDistance(query.feats, gallery.feats, device)


register_method(
    FinetuneMethod(
        name="dpm",
        description="Dynamic Prototype Mask (ACM MM'22): hierarchical mask generator, masked ArcFace, orthogonal "
                    "attention prototypes, query-masked test distance; two optimisers",
        build_model=build_dpm_model,
        build_criterion=build_dpm_criterion,
        build_test_distance=build_dpm_test_distance,
        build_second_pass=build_mask_generator_pass,
        section="dpm",
        section_type=DPMConfig,
    )
)
