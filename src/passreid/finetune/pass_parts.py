"""PASS part tokens as parts: ``method: pass_parts``.

A PASS-pretrained ViT has three [PART] tokens, each pre-trained on one horizontal third of the image
(upper, middle, lower band). This method keeps the PASS fine-tuning head and loss unchanged (BN necks,
``cat(CLS, mean(parts))`` fusion, CE + triplet) and adds, per part token k:

* an identity classifier on its BN-neck output (CE over the parts the visibility target calls visible,
  weight ``pass_parts.part_id_weight``), so each token is discriminative on its own;
* a **visibility head** ``Linear(D, 1)`` on the raw token, trained with binary cross-entropy
  (``pass_parts.visibility_weight``) against a target computed from the training batch's masks: band k is
  visible iff the share of its pixels that are foreground is >= ``pass_parts.visibility_threshold``.
  ``visibility_target: masks``: foreground = body pixels of the parsing masks (argmax not background);
  ``visibility_target: erasing``: no parsing masks at all; the mask is all-foreground before augmentation,
  so the target is the share of the band that zero padding and random erasing left. Random erasing is a
  synthetic occlusion whose extent is known exactly, which makes it a self-supervised occlusion signal.

Neither target is needed at test time: visibility is predicted from the image. The test distance is
BPBReID's visibility-aware distance (:class:`~passreid.eval.distance.VisiblePartDistance`) over
``[CLS (always visible), part_1..3]`` (raw tokens, each L2-normalised; a part counts when its predicted
visibility ``sigmoid >= 0.5`` in both images).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from passreid.config import require
from passreid.eval.distance import VisiblePartDistance
from passreid.eval.features import ExtractedFeatures
from passreid.finetune.bpbreid import pack_part_rows, unpack_part_rows
from passreid.finetune.methods import FinetuneMethod, build_reid_criterion, register_method
from passreid.losses.reid import ReIDCriterion, ReIDTrainOutput
from passreid.models import VisionTransformer
from passreid.models.factory import build_backbone, load_backbone_weights
from passreid.models.reid import ReIDModel, make_classifier

if TYPE_CHECKING:  # annotations only: passreid.finetune.config imports this module for its section
    from passreid.finetune.config import FinetuneConfig

__all__ = ["PassPartsConfig", "PassPartsCriterion", "PassPartsModel", "PassPartsTrainOutput", "band_visibility_targets"]


@dataclass
class PassPartsConfig:
    """PASS part tokens as parts (``method: pass_parts``): learned visibility + visibility-aware distance."""

    # Target of each part token's visibility head: "masks" = body pixels in its third of the image (parsing
    # masks, training only); "erasing" = the share of its third left by padding/random erasing (no masks).
    visibility_target: Literal["masks", "erasing"] = "masks"
    visibility_threshold: float = 0.1  # target 1 iff that share >= this (use ~0.5 with "erasing")
    visibility_weight: float = 1.0  # weight of the binary cross-entropy of the visibility heads
    part_id_weight: float = 1.0  # identity CE on each part token (own BN + classifier), visible parts only


def band_visibility_targets(masks: Tensor, num_bands: int, threshold: float) -> Tensor:
    """``(N, num_bands)`` 0/1: share of foreground pixels (``argmax != 0`` of ``masks (N, C, H, W)``, channel 0
    the background) in each of ``num_bands`` horizontal bands (rows ``round(i H / n)..round((i+1) H / n)``)
    is >= ``threshold``."""
    if masks.ndim != 4 or masks.shape[1] < 2:
        raise ValueError(f"expected (N, C >= 2, H, W) masks with the background first, got {tuple(masks.shape)}")
    foreground = (masks.argmax(dim=1) != 0).float()  # (N, H, W)
    height = foreground.shape[1]
    if height < num_bands:
        raise ValueError(f"masks of height {height} cannot be split into {num_bands} bands")
    edges = [round(i * height / num_bands) for i in range(num_bands + 1)]
    shares = torch.stack([foreground[:, edges[i]:edges[i + 1]].mean(dim=(1, 2)) for i in range(num_bands)], dim=1)
    return (shares >= threshold).float()


@dataclass
class PassPartsTrainOutput:
    """The PASS head's output plus per-part logits, visibility logits and their targets."""

    base: ReIDTrainOutput
    part_logits: Tensor  # (N, P, C)
    visibility_logits: Tensor  # (N, P)
    visibility_targets: Tensor | None  # (N, P) 0/1, from the batch's masks


class PassPartsModel(ReIDModel):
    """:class:`ReIDModel` with the PASS head plus per-part classifiers and visibility heads.

    Eval forward: ``(N, (1+P) * D + 1 + P)`` rows ``[CLS, part_1..P | 1, sigmoid(visibility)]`` (raw tokens
    after the final LN), see :func:`~passreid.finetune.bpbreid.unpack_part_rows`.
    """

    def __init__(self, backbone: VisionTransformer, num_classes: int, visibility_threshold: float = 0.1,
                 **head_options) -> None:
        super().__init__(backbone, num_classes, head="pass", **head_options)
        if not self.head.multi_neck:
            raise ValueError("pass_parts needs model.multi_neck: true (each part token's own BN neck)")
        dim, parts = backbone.embed_dim, backbone.num_part_tokens
        self.visibility_threshold = visibility_threshold
        self.visibility_heads = nn.ModuleList(nn.Linear(dim, 1) for _ in range(parts))
        self.part_classifiers = nn.ModuleList(make_classifier(dim, num_classes) for _ in range(parts))

    @property
    def feature_dim(self) -> int:
        return (1 + self.backbone.num_part_tokens) * (self.backbone.embed_dim + 1)

    def forward(self, images: Tensor, camids: Tensor | None = None,
                masks: Tensor | None = None) -> PassPartsTrainOutput | Tensor:
        depth, leading = self.backbone.depth, self.backbone.num_leading_tokens()
        tokens = self.backbone.norm(self.encode(images, depth, camids))[:, :leading]
        parts = tokens[:, 1:]
        visibility_logits = torch.cat([head(parts[:, k]) for k, head in enumerate(self.visibility_heads)], dim=1)
        if not self.training:
            visibility = torch.cat([torch.ones_like(visibility_logits[:, :1]), visibility_logits.sigmoid()], dim=1)
            return pack_part_rows(tokens, visibility)
        out = self.head(tokens)
        base = ReIDTrainOutput(logits=[self.head.classifier(out.after)], feats=[out.before], weights=[1.0])
        part_logits = torch.stack([classifier(self.head.necks[k + 1](parts[:, k]))
                                   for k, classifier in enumerate(self.part_classifiers)], dim=1)
        targets = None
        if masks is not None:
            targets = band_visibility_targets(masks, parts.shape[1], self.visibility_threshold)
        return PassPartsTrainOutput(base, part_logits, visibility_logits, targets)


class PassPartsCriterion(nn.Module):
    """PASS loss (:class:`ReIDCriterion`) + ``part_id_weight`` x part CE (visible parts) + ``visibility_weight`` x
    BCE of the visibility heads. Adds ``part_id``, ``visibility`` and ``visibility_acc`` to the terms."""

    def __init__(self, base: ReIDCriterion, part_id_weight: float = 1.0, visibility_weight: float = 1.0) -> None:
        super().__init__()
        self.base = base
        self.part_id_weight = part_id_weight
        self.visibility_weight = visibility_weight

    def forward(self, output: PassPartsTrainOutput, targets: Tensor) -> dict[str, Tensor]:
        if output.visibility_targets is None:
            raise ValueError("pass_parts: the visibility heads need the training batch's masks (masks=...); the "
                             "data pipeline did not provide them")
        terms = self.base(output.base, targets)
        accuracy = terms.pop("acc")
        visible = output.visibility_targets > 0.5
        labels = targets.unsqueeze(1).expand_as(visible)
        if bool(visible.any()):
            part_id = F.cross_entropy(output.part_logits[visible].float(), labels[visible],
                                      label_smoothing=self.base.label_smoothing)
        else:
            part_id = output.part_logits.sum() * 0.0
        visibility = F.binary_cross_entropy_with_logits(output.visibility_logits.float(),
                                                        output.visibility_targets.float())
        total = terms["loss"] + self.part_id_weight * part_id + self.visibility_weight * visibility
        with torch.no_grad():
            visibility_acc = ((output.visibility_logits > 0) == visible).float().mean()
        return {**terms, "loss": total, "part_id": part_id, "visibility": visibility,
                "visibility_acc": visibility_acc, "acc": accuracy}


def build_pass_parts_model(cfg: FinetuneConfig, num_classes: int, num_cameras: int,
                           load_weights: bool = True) -> PassPartsModel:
    model = cfg.model
    if model.jpm:
        raise ValueError("method pass_parts does not combine with model.jpm")
    if model.num_part_tokens < 1:
        raise ValueError("method pass_parts needs a ViT with PASS part tokens (model.num_part_tokens >= 1)")
    backbone = build_backbone(cfg.model)
    if load_weights:
        load_backbone_weights(backbone, cfg.model)
    return PassPartsModel(backbone, num_classes, cfg.pass_parts.visibility_threshold, feat_fusion=model.feat_fusion,
                          multi_neck=model.multi_neck, normalize_necks=model.normalize_necks,
                          neck_feat=model.neck_feat, num_cameras=num_cameras if model.sie_camera else 0,
                          sie_coe=model.sie_coe)


def build_pass_parts_criterion(cfg: FinetuneConfig) -> PassPartsCriterion:
    return PassPartsCriterion(build_reid_criterion(cfg), cfg.pass_parts.part_id_weight,
                              cfg.pass_parts.visibility_weight)


def build_pass_parts_test_distance(cfg: FinetuneConfig, query: ExtractedFeatures, gallery: ExtractedFeatures,
                                   device: torch.device | None = None) -> VisiblePartDistance:
    """Visibility-aware distance over ``[CLS, part tokens]``, CLS always visible."""
    num_embeddings = cfg.model.num_part_tokens + 1
    q_parts, q_vis = unpack_part_rows(torch.as_tensor(query.feats), num_embeddings)
    g_parts, g_vis = unpack_part_rows(torch.as_tensor(gallery.feats), num_embeddings)
    return VisiblePartDistance(q_parts, q_vis, g_parts, g_vis, visibility="binary", threshold=0.5,
                               normalize=True, always_visible=(0,), device=device)


def validate_pass_parts_config(cfg: FinetuneConfig) -> None:
    """The ``pass_parts`` section's ranges (a :class:`ConfigError` naming the key)."""
    require(0.0 <= cfg.pass_parts.visibility_threshold <= 1.0, "pass_parts.visibility_threshold",
            f"must be in [0, 1], got {cfg.pass_parts.visibility_threshold}")


register_method(
    FinetuneMethod(
        name="pass_parts",
        description="PASS head + the 3 part tokens as parts with learned visibility, visibility-aware part distance",
        build_model=build_pass_parts_model,
        build_criterion=build_pass_parts_criterion,
        build_test_distance=build_pass_parts_test_distance,
        train_masks=lambda cfg: "parsing" if cfg.pass_parts.visibility_target == "masks" else "constant",
        validate=validate_pass_parts_config,
        section="pass_parts",
        section_type=PassPartsConfig,
    )
)
