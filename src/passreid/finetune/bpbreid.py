"""BPBReID (Somers et al., WACV'23): ``method: bpbreid`` (bpbreid: torchreid/models/bpbreid.py,
torchreid/losses/GiLt_loss.py, torchreid/metrics/distance.py).

* **Spatial features** ``F (N, C, h, w)``, from ``model.arch``:
  - ``hrnet_w32`` / ``resnet50``: the published backbones (:mod:`passreid.models.cnn`): HRNet-W32's four
    last-stage branches upsampled to stride 4 and concatenated (1920 channels, 96 x 32 at 384 x 128), or
    ResNet-50's ``layer4`` with last stride 1 (2048 channels, 24 x 8 at 384 x 128);
  - a ViT (passreid's own variant): the **patch-token grid of the last block** (after the final LayerNorm;
    leading [CLS]/[PART] tokens are not used), e.g. 16 x 8 for 256 x 128 input with stride 16.
  The part machinery is backbone-agnostic; only the feature map's width and resolution differ.
* **Body-part attention.** A pixel classifier (BN2d + 1x1 conv to K+1 channels, conv init N(0, 0.001))
  gives ``A = softmax`` over [background, part_1..K]; foreground = ``max_k A_k``.
* **Embeddings.** global = GAP(F); foreground = GAP(F * foreground) (the published foreground head is a
  plain average of the masked map); part k = ``sum_xy A_k F / max(sum_xy A_k, 1e-6)`` (GWAP). Each type
  is reduced by its own ``Linear(C, 512) + BN1d + ReLU`` (one shared by the K parts); concat-parts =
  ``cat(f_1..f_K)``. Every type has a BN-neck classifier (frozen BN bias, bias-free Linear N(0, 0.001));
  each part has its own. (The published background embedding takes no loss in GiLt and is omitted.)
* **Visibility.** Binary: ``v_k = 1`` iff part k wins the per-pixel argmax somewhere; foreground
  visibility = max over all K+1 channels (so 1); continuous: ``max_xy A_k``.
* **GiLt loss.** CE with label smoothing 0.1 on global, foreground and concat-parts (weight 1 each),
  part-averaged batch-hard triplet (margin 0.3) on the K raw part embeddings (weight 1; foreground
  triplet weight 1 in the Market/Occluded-REID recipes), plus the body-part attention loss: pixel-wise CE
  with label smoothing 0.1 against ``argmax`` of the target masks resized (bilinear) to the feature map,
  weight 0.35 (0.7 for Occluded-REID).
* **Test.** No masks. The eval forward packs ``[bn_foreground, part_1..K]`` (K+1 embeddings of 512) and
  their visibility into one row per image; :func:`build_bpbreid_test_distance` unpacks them into
  :class:`~passreid.eval.distance.VisiblePartDistance` (per-embedding L2 normalisation, plain Euclidean
  per part, mean over mutually visible parts; ``sqrt(v_q v_g)`` weights for continuous visibility).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from passreid.data.masks import num_parts
from passreid.eval.distance import VisiblePartDistance
from passreid.eval.features import ExtractedFeatures
from passreid.finetune.methods import FinetuneMethod, register_method
from passreid.losses.reid import identity_loss
from passreid.models import VisionTransformer
from passreid.models.cnn import build_cnn_backbone, is_cnn_arch
from passreid.models.factory import build_backbone, load_backbone_weights
from passreid.models.reid import make_bnneck, make_classifier

if TYPE_CHECKING:  # annotations only: passreid.finetune.config imports this module for its section
    from passreid.finetune.config import FinetuneConfig

__all__ = [
    "BNClassifier",
    "BPBReIDConfig",
    "BPBReIDCriterion",
    "BPBReIDModel",
    "BPBReIDTrainOutput",
    "PixelToPartClassifier",
    "PoolingReduction",
    "body_part_attention_loss",
    "build_bpbreid_test_distance",
    "pack_part_rows",
    "part_averaged_triplet_loss",
    "patch_feature_map",
    "spatial_feature_map",
    "unpack_part_rows",
]


@dataclass
class BPBReIDConfig:
    """BPBReID (``method: bpbreid``). Defaults are the published GiLt recipe (bpbreid:
    configs/bpbreid/bpbreid_occ_duke_train.yaml over torchreid/scripts/default_config.py)."""

    dim_reduce: int = 512  # Linear(C, 512) + BN + ReLU after pooling, one per embedding type
    id_weight_global: float = 1.0  # GiLt: identity (CE, label smoothing) on global, foreground, concat-parts
    id_weight_foreground: float = 1.0
    id_weight_concat: float = 1.0
    triplet_weight_parts: float = 1.0  # part-averaged batch-hard triplet on the K part embeddings
    triplet_weight_foreground: float = 0.0  # 1 in the Market-1501 / Occluded-REID configs
    triplet_margin: float = 0.3
    label_smoothing: float = 0.1
    pixel_ce_weight: float = 0.35  # body-part attention loss (0.7 for Occluded-REID)
    pixel_label_smoothing: float = 0.1
    visibility: Literal["binary", "continuous"] = "binary"  # test visibility scores (distance weights)


# ------------------------------------------------------------------------------------------ layers


class PixelToPartClassifier(nn.Module):
    """BN2d + 1x1 conv to ``num_parts + 1`` channels (background first); conv weights N(0, 0.001), bias 0."""

    def __init__(self, dim: int, num_parts: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.classifier = nn.Conv2d(dim, num_parts + 1, kernel_size=1)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.bn(features))


class PoolingReduction(nn.Module):
    """``Linear(C, out) + BN1d + ReLU`` on pooled embeddings ``(N, C)`` or ``(N, K, C)`` (Linear N(0, 0.01))."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:
            batch, parts, _ = x.shape
            return self.forward(x.flatten(0, 1)).view(batch, parts, -1)
        return F.relu(self.bn(self.linear(x)))


class BNClassifier(nn.Module):
    """BN neck (frozen bias) + bias-free classifier: ``(bn_feature, logits)``."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = make_bnneck(dim)
        self.classifier = make_classifier(dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feature = self.bn(x)
        return feature, self.classifier(feature)


def patch_feature_map(backbone: VisionTransformer, images: Tensor) -> Tensor:
    """The last block's patch tokens (after the final LN) as a feature map ``(N, C, h, w)``."""
    tokens = backbone.forward_tokens(images)
    grid = backbone.patch_embed.grid_size(images.shape[2], images.shape[3])
    patches = tokens[:, backbone.num_leading_tokens():]
    return patches.reshape(patches.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)


def spatial_feature_map(backbone: nn.Module, images: Tensor) -> Tensor:
    """``F (N, C, h, w)``: a ViT's patch grid, or the map a CNN backbone of :mod:`passreid.models.cnn` returns."""
    if isinstance(backbone, VisionTransformer):
        return patch_feature_map(backbone, images)
    return backbone(images)


def feature_channels(backbone: nn.Module) -> int:
    """``C`` of :func:`spatial_feature_map` for ``backbone``."""
    return backbone.embed_dim if isinstance(backbone, VisionTransformer) else backbone.out_channels


def pack_part_rows(embeddings: Tensor, visibility: Tensor) -> Tensor:
    """``(N, P, D)`` embeddings + ``(N, P)`` visibility -> one ``(N, P*D + P)`` row per image (eval output)."""
    return torch.cat([embeddings.flatten(1), visibility.to(embeddings.dtype)], dim=1)


def unpack_part_rows(rows: Tensor, num_embeddings: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack_part_rows` for ``num_embeddings`` (P) embeddings per row."""
    rows = torch.as_tensor(rows)
    width = rows.shape[1] - num_embeddings
    if rows.ndim != 2 or width <= 0 or width % num_embeddings:
        raise ValueError(f"cannot unpack rows of shape {tuple(rows.shape)} into {num_embeddings} embeddings + "
                         f"{num_embeddings} visibility scores")
    dim = width // num_embeddings
    return rows[:, :width].reshape(-1, num_embeddings, dim), rows[:, width:]


# ------------------------------------------------------------------------------------------- model


@dataclass
class BPBReIDTrainOutput:
    """Training output: embeddings, logits and visibility per type, pixel scores and the target masks."""

    embeddings: dict[str, Tensor]  # global/foreground (N, D), concat (N, K*D), parts (N, K, D): before BN
    logits: dict[str, Tensor]  # global/foreground/concat (N, C), parts (N, K, C)
    visibility: dict[str, Tensor]  # foreground (N,), parts (N, K)
    pixel_scores: Tensor  # (N, K+1, h, w) pixel classifier logits
    target_masks: Tensor | None = None  # (N, K+1, Hm, Wm) from the data pipeline
    extra: dict[str, Tensor] = field(default_factory=dict)


class BPBReIDModel(nn.Module):
    """Spatial features (:func:`spatial_feature_map`) + BPBReID's part attention, pooling, reductions, classifiers.

    ``forward(images, camids=None, masks=None)``: a :class:`BPBReIDTrainOutput` in training mode (``masks`` are
    the (K+1)-channel targets of the body-part attention loss); in eval mode ``(N, (K+1)*D + K+1)`` rows
    ``[bn_foreground, part_1..K | visibility]`` (see :func:`unpack_part_rows`).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, num_parts: int, dim_reduce: int = 512,
                 visibility: str = "binary") -> None:
        super().__init__()
        if num_parts < 1:
            raise ValueError(f"BPBReID needs at least one part, got {num_parts}")
        if visibility not in ("binary", "continuous"):
            raise ValueError(f"visibility must be 'binary' or 'continuous', got {visibility!r}")
        dim = feature_channels(backbone)
        self.backbone = backbone
        self.num_parts = num_parts
        self.dim_reduce = dim_reduce
        self.visibility_mode = visibility
        self.pixel_classifier = PixelToPartClassifier(dim, num_parts)
        self.global_reduction = PoolingReduction(dim, dim_reduce)
        self.foreground_reduction = PoolingReduction(dim, dim_reduce)
        self.parts_reduction = PoolingReduction(dim, dim_reduce)
        self.global_classifier = BNClassifier(dim_reduce, num_classes)
        self.foreground_classifier = BNClassifier(dim_reduce, num_classes)
        self.concat_classifier = BNClassifier(num_parts * dim_reduce, num_classes)
        self.parts_classifiers = nn.ModuleList(BNClassifier(dim_reduce, num_classes) for _ in range(num_parts))

    @property
    def feature_dim(self) -> int:
        """Width of an eval row: K+1 embeddings and their visibility scores."""
        return (self.num_parts + 1) * (self.dim_reduce + 1)

    def part_visibility(self, attention: Tensor) -> Tensor:
        """``(N, K+1)`` visibility of [background, parts] from the attention ``(N, K+1, h, w)``."""
        if self.visibility_mode == "binary":
            winners = F.one_hot(attention.argmax(dim=1), self.num_parts + 1)  # (N, h, w, K+1)
            return winners.amax(dim=(1, 2)).to(attention.dtype)
        return attention.amax(dim=(2, 3))

    def forward(self, images: Tensor, camids: Tensor | None = None,
                masks: Tensor | None = None) -> BPBReIDTrainOutput | Tensor:
        features = spatial_feature_map(self.backbone, images)  # (N, C, h, w)
        scores = self.pixel_classifier(features)
        attention = scores.float().softmax(dim=1).to(features.dtype)
        parts_attention = attention[:, 1:]
        foreground = parts_attention.amax(dim=1)
        visibility = self.part_visibility(attention)

        global_emb = self.global_reduction(features.mean(dim=(2, 3)))
        foreground_emb = self.foreground_reduction((features * foreground.unsqueeze(1)).mean(dim=(2, 3)))
        pooled = torch.einsum("nkhw,nchw->nkc", parts_attention, features)
        pooled = pooled / parts_attention.sum(dim=(2, 3)).clamp(min=1e-6).unsqueeze(-1)
        parts_emb = self.parts_reduction(pooled)  # (N, K, D)
        concat_emb = parts_emb.flatten(1)

        bn_foreground, foreground_logits = self.foreground_classifier(foreground_emb)
        foreground_vis = visibility.amax(dim=1)
        parts_vis = visibility[:, 1:]
        if not self.training:
            return pack_part_rows(torch.cat([bn_foreground.unsqueeze(1), parts_emb], dim=1),
                                  torch.cat([foreground_vis.unsqueeze(1), parts_vis], dim=1))
        _, global_logits = self.global_classifier(global_emb)
        _, concat_logits = self.concat_classifier(concat_emb)
        parts_logits = torch.stack([cls(parts_emb[:, k])[1] for k, cls in enumerate(self.parts_classifiers)], dim=1)
        return BPBReIDTrainOutput(
            embeddings={"global": global_emb, "foreground": foreground_emb, "concat": concat_emb, "parts": parts_emb},
            logits={"global": global_logits, "foreground": foreground_logits, "concat": concat_logits,
                    "parts": parts_logits},
            visibility={"foreground": foreground_vis, "parts": parts_vis},
            pixel_scores=scores,
            target_masks=masks,
        )


# ------------------------------------------------------------------------------------------- losses


def _part_distances(parts: Tensor, eps: float = 1e-16) -> Tensor:
    """``(K, N, N)`` Euclidean distances between the images of each part (sqrt guarded at 0, as published)."""
    parts = parts.float().transpose(0, 1)  # (K, N, D)
    dot = parts @ parts.transpose(1, 2)
    squared = dot.diagonal(dim1=1, dim2=2)
    dist = F.relu(squared.unsqueeze(2) - 2 * dot + squared.unsqueeze(1))
    zero = (dist == 0).float()
    return torch.sqrt(dist + zero * eps) * (1 - zero)


def part_averaged_triplet_loss(parts: Tensor, labels: Tensor, margin: float = 0.3,
                               visibility: Tensor | None = None) -> Tensor:
    """BPBReID's part-averaged batch-hard triplet loss on ``(N, K, D)`` embeddings (hard margin).

    Per-part Euclidean distances are averaged over parts (a mean over mutually visible parts when
    ``visibility (N, K)`` is given; pairs without one are excluded); then for each anchor the farthest
    *other* image of its identity and the closest image of another identity give
    ``relu(d_ap - d_an + margin)``, averaged over the anchors that have both.
    """
    if parts.ndim != 3 or labels.shape != (parts.shape[0],):
        raise ValueError(f"expected parts (N, K, D) and labels (N,), got {tuple(parts.shape)}, {tuple(labels.shape)}")
    dist_k = _part_distances(parts)
    if visibility is None:
        dist = dist_k.mean(dim=0)
        valid = torch.ones_like(dist, dtype=torch.bool)
    else:
        vis = visibility.float().t()  # (K, N)
        weight = vis.unsqueeze(2) * vis.unsqueeze(1)
        total = weight.sum(dim=0)
        valid = total > 0
        dist = (dist_k * weight).sum(dim=0) / total.clamp(min=1e-12)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye & valid
    negative = ~same & valid
    hardest_positive = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
    hardest_negative = dist.masked_fill(~negative, float("inf")).amin(dim=1)
    anchors = positive.any(dim=1) & negative.any(dim=1)
    if not bool(anchors.any()):
        raise ValueError("part-averaged triplet loss: no anchor has both a positive (another image of its "
                         "identity) and a negative in the batch; use P x K batches with K >= 2")
    return F.relu(hardest_positive[anchors] - hardest_negative[anchors] + margin).mean()


def body_part_attention_loss(pixel_scores: Tensor, target_masks: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Pixel-wise CE of the part classifier against ``argmax`` of the targets resized (bilinear, corners
    aligned) to the feature map: ``pixel_scores (N, K+1, h, w)``, ``target_masks (N, K+1, Hm, Wm)``."""
    if target_masks.shape[:2] != pixel_scores.shape[:2]:
        raise ValueError(f"target masks {tuple(target_masks.shape)} do not match the pixel classifier's "
                         f"{tuple(pixel_scores.shape)} in (N, K+1); check data.mask_preprocess")
    resized = F.interpolate(target_masks.float(), size=pixel_scores.shape[2:], mode="bilinear", align_corners=True)
    return F.cross_entropy(pixel_scores.float(), resized.argmax(dim=1), label_smoothing=label_smoothing)


class BPBReIDCriterion(nn.Module):
    """GiLt + body-part attention loss. Returns ``loss`` (weighted total), each term unweighted, and ``acc``
    (top-1 of the global classifier)."""

    def __init__(self, id_weight_global: float = 1.0, id_weight_foreground: float = 1.0, id_weight_concat: float = 1.0,
                 triplet_weight_parts: float = 1.0, triplet_weight_foreground: float = 0.0, triplet_margin: float = 0.3,
                 label_smoothing: float = 0.1, pixel_ce_weight: float = 0.35,
                 pixel_label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.id_weights = {"global": id_weight_global, "foreground": id_weight_foreground, "concat": id_weight_concat}
        self.triplet_weights = {"parts": triplet_weight_parts, "foreground": triplet_weight_foreground}
        self.triplet_margin = triplet_margin
        self.label_smoothing = label_smoothing
        self.pixel_ce_weight = pixel_ce_weight
        self.pixel_label_smoothing = pixel_label_smoothing

    def forward(self, output: BPBReIDTrainOutput, targets: Tensor) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        weighted = []
        for name, weight in self.id_weights.items():
            if weight > 0:
                terms[f"id_{name}"] = identity_loss(output.logits[name], targets, self.label_smoothing)
                weighted.append(weight * terms[f"id_{name}"])
        for name, weight in self.triplet_weights.items():
            if weight > 0:
                emb = output.embeddings[name]
                emb = emb if emb.ndim == 3 else emb.unsqueeze(1)
                terms[f"triplet_{name}"] = part_averaged_triplet_loss(emb, targets, self.triplet_margin)
                weighted.append(weight * terms[f"triplet_{name}"])
        if self.pixel_ce_weight > 0:
            if output.target_masks is None:
                raise ValueError("bpbreid: the body-part attention loss needs the training batch's part masks "
                                 "(masks=...); the data pipeline did not provide them")
            terms["pixel_ce"] = body_part_attention_loss(output.pixel_scores, output.target_masks,
                                                         self.pixel_label_smoothing)
            weighted.append(self.pixel_ce_weight * terms["pixel_ce"])
        with torch.no_grad():
            accuracy = (output.logits["global"].argmax(dim=1) == targets).float().mean()
        return {"loss": torch.stack(weighted).sum(), **terms, "acc": accuracy}


# ------------------------------------------------------------------------------------------ method


def build_bpbreid_model(cfg: FinetuneConfig, num_classes: int, num_cameras: int,
                        load_weights: bool = True) -> BPBReIDModel:
    """Backbone of ``cfg.model.arch`` (a ViT, or HRNet-W32 / ResNet-50) + its ``model.pretrained`` weights, with
    BPBReID's head for ``data.mask_preprocess``'s K parts."""
    if cfg.model.sie_camera or cfg.model.jpm:
        raise ValueError("method bpbreid does not combine with model.sie_camera or model.jpm")
    backbone = build_cnn_backbone(cfg.model.arch) if is_cnn_arch(cfg.model.arch) else build_backbone(cfg.model)
    if load_weights:
        load_backbone_weights(backbone, cfg.model)
    return BPBReIDModel(backbone, num_classes, num_parts(cfg.data.mask_preprocess), cfg.bpbreid.dim_reduce,
                        cfg.bpbreid.visibility)


def build_bpbreid_criterion(cfg: FinetuneConfig) -> BPBReIDCriterion:
    b = cfg.bpbreid
    return BPBReIDCriterion(b.id_weight_global, b.id_weight_foreground, b.id_weight_concat, b.triplet_weight_parts,
                            b.triplet_weight_foreground, b.triplet_margin, b.label_smoothing, b.pixel_ce_weight,
                            b.pixel_label_smoothing)


def build_bpbreid_test_distance(cfg: FinetuneConfig, query: ExtractedFeatures, gallery: ExtractedFeatures,
                                device: torch.device | None = None) -> VisiblePartDistance:
    """Visibility-aware distance over ``[bn_foreground, parts]`` unpacked from the eval rows."""
    num_embeddings = num_parts(cfg.data.mask_preprocess) + 1
    q_parts, q_vis = unpack_part_rows(torch.as_tensor(query.feats), num_embeddings)
    g_parts, g_vis = unpack_part_rows(torch.as_tensor(gallery.feats), num_embeddings)
    mode = "binary" if cfg.bpbreid.visibility == "binary" else "weighted"
    return VisiblePartDistance(q_parts, q_vis, g_parts, g_vis, visibility=mode, normalize=True, device=device)


register_method(
    FinetuneMethod(
        name="bpbreid",
        description="BPBReID: body-part attention on HRNet-W32 / ResNet-50 maps or the ViT patch grid, GiLt loss, "
                    "visibility-aware part distance",
        build_model=build_bpbreid_model,
        build_criterion=build_bpbreid_criterion,
        build_test_distance=build_bpbreid_test_distance,
        sie_and_jpm=False,
        train_masks=lambda cfg: "parsing",
        section="bpbreid",
        section_type=BPBReIDConfig,
    )
)
