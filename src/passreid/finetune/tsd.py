"""TSD, Teacher-Student Decoder (Gao et al., ICASSP'24), as the fine-tuning method ``method: tsd``.

Checked against the official code (TSD, hh23333/TSD: model/tsd.py, model/neck/decoder.py,
processor/processor_tsd.py, loss/make_loss.py). On the passreid ViT (plain [CLS]):

* **Backbone split.** ``share`` = tokens after all blocks but the last (no LN). ``b1`` = the last block + the
  final LN (TransReID's ``b1`` is a copy of them; the backbone's own copies are otherwise unused, so they serve
  as ``b1`` here, as in :class:`~passreid.models.reid.ReIDModel` with JPM). Global ``g = b1(share)[:, 0]``
  with a BN neck; the patch tokens of ``b1(share)`` feed the parsing classifier.
* **Parsing** (:class:`TokenPartClassifier`): BN1d + bias-free ``Linear(D, P+1)`` (N(0, 0.001)) per patch token,
  ``pi = softmax`` over [background, part_1..P]. Targets: the training masks resized bilinearly (corners
  aligned) to the token grid, argmax. Mask-pooled parts ``p^m_k = sum_n pi_nk t_n / sum_n pi_nk``; their
  concatenation has a BN neck + classifier (``cat_m``); the foreground head pools with ``sum_k pi_nk`` (``fg``).
* **Decoder** (:class:`PartDecoder`, shared by student and teacher): queries ``[CLS.detach(), q_0, q_1..q_P]``
  (learned, trunc-normal std ``D^-0.5``) over ``LN(share)``; self-attention (8 heads, residual) -> LN -> drop the
  CLS slot -> cross-attention to the LN'd patch tokens **without** residual -> LN -> FFN (4D, ReLU) with the
  cross-attention output as residual. ``q_1..q_P`` are the part features; ``q_0`` is dropped.
* **Teacher pass**: the same decoder with a cross-attention mask ``M_{kn} = 1[u < pi_nk]`` (u ~ U(0, 1)) sampled
  from the *predicted* parsing (query slot k <-> channel k, the background for ``q_0``); masked logits are set to
  -1e4 before the softmax. ``tsd.teacher_mask: target`` uses the one-hot training targets instead.
* **Losses** (all weight 1 as published; :class:`TSDCriterion`): CE (no smoothing) on global, student concat
  (``cat``), mask-pooled concat (``cat_m``), teacher concat (``aux``, the student's BN + classifier) and
  foreground; soft-margin batch-hard triplet on ``g``; part-averaged soft triplet on the student, mask-pooled
  and teacher parts; sigmoid focal loss (alpha 0.25, gamma 2) of the visibility predictor (BN1d + Linear(D, 1)
  on each student part) against "part k wins the target argmax somewhere"; distillation ``1 - cos(cat(student),
  cat(teacher).detach())``; parsing pixel CE with label smoothing 0.1 (``eps/(C-1)`` off-target, as published);
  diversity ``mean_{k != l} relu(cos(p_k, p_l))`` on the teacher parts and on parts pooled with a detached pi
  (pairs of mirrored parts excluded for ``eight``, as published).
* **Test**: rows ``[BN(g), BN(p_1..p_P)]`` (the student parts BN'd jointly, then split) with visibility
  ``[1, 1[sigmoid(v_k) > 0.5]]``; distance ``sum_k w_k ||q_k - g_k|| / sum_k w_k``, ``w_k = sqrt(v_k^q v_k^g)``
  on L2-normalised vectors, global always visible
  (:class:`~passreid.eval.distance.VisiblePartDistance`, weighted mode).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from passreid.config import require
from passreid.data.masks import num_parts
from passreid.eval.distance import VisiblePartDistance
from passreid.eval.features import ExtractedFeatures
from passreid.finetune.bpbreid import pack_part_rows, unpack_part_rows
from passreid.finetune.methods import FinetuneMethod, register_method
from passreid.losses.reid import batch_hard_triplet_loss, euclidean_dist, identity_loss
from passreid.models import VisionTransformer
from passreid.models.factory import build_backbone, load_backbone_weights
from passreid.models.reid import make_bnneck, make_classifier

if TYPE_CHECKING:  # annotations only: passreid.finetune.config imports this module for its section
    from passreid.finetune.config import FinetuneConfig

__all__ = [
    "DIVERSITY_PART_GROUPS",
    "MaskedMultiheadAttention",
    "PartDecoder",
    "TSDConfig",
    "TSDCriterion",
    "TSDModel",
    "TSDTrainOutput",
    "TokenPartClassifier",
    "diversity_loss",
    "part_averaged_soft_triplet_loss",
    "parsing_loss",
    "sigmoid_focal_loss",
    "weighted_part_pooling",
]


@dataclass
class TSDConfig:
    """Teacher-Student Decoder (``method: tsd``). Defaults are the published recipe (TSD: run_tsd.sh)."""

    decoder_heads: int = 8  # heads of the decoder's self- and cross-attention
    ffn_ratio: int = 4  # decoder FFN width = ffn_ratio x D
    with_fore_head: bool = True  # MODEL.WITH_FORE_HEAD: foreground head (pooling with sum_k pi_k) + its CE
    # Teacher cross-attention mask: "sampled" = 1[u < pi] from the predicted parsing (published); "target" = the
    # one-hot of the training masks' argmax (the variant left commented out in the released code).
    teacher_mask: Literal["sampled", "target"] = "sampled"
    id_weight: float = 1.0  # CE (no label smoothing) on each of global, cat, cat_m, aux, fg
    triplet_weight: float = 1.0  # soft triplet on g + part-averaged soft triplet on student / pooled / teacher parts
    visibility_weight: float = 1.0  # sigmoid focal loss of the visibility predictor
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    mimic_weight: float = 1.0  # 1 - cos(student parts, teacher parts.detach())
    parsing_weight: float = 1.0  # MODEL.MASK_LOSS_WEIGHT: pixel CE of the parsing classifier
    parsing_label_smoothing: float = 0.1
    diversity_weight: float = 1.0  # MODEL.WITH_DIVERSE_LOSS (0 = off): teacher parts + detached-pi pooled parts
    visibility_threshold: float = 0.5  # test: part visible iff sigmoid(visibility logit) > this


#: Parts that count as one for the diversity loss (TSD ``diverse_loss_w``): mirrored parts of ``eight``.
DIVERSITY_PART_GROUPS = {"eight": (0, 1, 1, 2, 3, 3, 4, 4)}
MASKED_LOGIT = -1e4  # TSD's value for masked attention logits


# ------------------------------------------------------------------------------------------ layers


class TokenPartClassifier(nn.Module):
    """Parsing / visibility head on tokens ``(B, N, D)``: BN1d over D, then a bias-free Linear (N(0, 0.001))."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.classifier = nn.Linear(dim, out_dim, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.classifier(self.bn(tokens.transpose(1, 2)).transpose(1, 2))


class MaskedMultiheadAttention(nn.Module):
    """Multi-head attention with q/k/v/out projections and an optional 0/1 key mask ``(B, Q, K)``.

    Where the mask is 0 the logit is set to -1e4 before the softmax (TSD), so a fully masked query attends
    uniformly. ``residual`` adds the query to the output.
    """

    def __init__(self, dim: int, num_heads: int, residual: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads (tsd.decoder_heads)")
        self.num_heads, self.scale, self.residual = num_heads, (dim // num_heads) ** -0.5, residual
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        return x.reshape(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def attention(self, query: Tensor, key: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention probabilities ``(B, heads, Q, K)``."""
        logits = (self._heads(self.q_proj(query)) @ self._heads(self.k_proj(key)).transpose(-2, -1)) * self.scale
        if mask is not None:
            logits = logits.masked_fill(mask.unsqueeze(1) == 0, MASKED_LOGIT)
        return logits.softmax(dim=-1)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None) -> Tensor:
        attn = self.attention(query, key, mask)
        out = (attn @ self._heads(self.v_proj(value))).transpose(1, 2).flatten(2)
        out = self.out_proj(out)
        return query + out if self.residual else out


class PartDecoder(nn.Module):
    """TSD's one-layer part decoder (module docstring). ``forward(queries (B, 1+P+1, D), memory (B, N, D),
    mask (B, P+1, N) or None) -> (B, P+1, D)``: the outputs of ``[q_0, q_1..q_P]``."""

    def __init__(self, dim: int, num_heads: int = 8, ffn_ratio: int = 4) -> None:
        super().__init__()
        self.self_attention = MaskedMultiheadAttention(dim, num_heads, residual=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attention = MaskedMultiheadAttention(dim, num_heads, residual=False)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_ratio * dim), nn.ReLU(), nn.Linear(ffn_ratio * dim, dim))

    def forward(self, queries: Tensor, memory: Tensor, mask: Tensor | None = None) -> Tensor:
        queries = self.norm1(self.self_attention(queries, queries, queries))[:, 1:]  # drop the CLS slot
        crossed = self.cross_attention(queries, memory, memory, mask)
        return crossed + self.ffn(self.norm2(crossed))


def weighted_part_pooling(tokens: Tensor, weights: Tensor) -> Tensor:
    """``(B, N, D)`` tokens, ``(B, N, P)`` weights -> ``(B, P, D)``: ``sum_n w_nk t_n / max(sum_n w_nk, 1e-6)``."""
    pooled = torch.einsum("bnp,bnd->bpd", weights, tokens)
    return pooled / weights.sum(dim=1).clamp(min=1e-6).unsqueeze(-1)


# ------------------------------------------------------------------------------------------- model


@dataclass
class TSDTrainOutput:
    """Training output of :class:`TSDModel` (raw features are before their BN necks)."""

    logits: dict[str, Tensor]  # global, cat, cat_m, aux, (fg): (B, C)
    global_feature: Tensor  # (B, D)
    parts: dict[str, Tensor]  # student "part", mask-pooled "part_m", teacher "aux", detached-pi "part_md": (B, P, D)
    visibility_logits: Tensor  # (B, P)
    visibility_targets: Tensor  # (B, P) 0/1
    pixel_logits: Tensor  # (B, N, P+1)
    pixel_targets: Tensor  # (B, N) class index, 0 = background


class TSDModel(nn.Module):
    """ViT + TSD heads. ``forward(images, camids=None, masks=None)``: a :class:`TSDTrainOutput` in training mode
    (``masks (B, P+1, Hm, Wm)`` are required), eval rows ``[BN(g), BN(p_1..p_P) | 1, visibility]`` otherwise."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, num_parts: int, decoder_heads: int = 8,
                 ffn_ratio: int = 4, with_fore_head: bool = True, teacher_mask: str = "sampled",
                 visibility_threshold: float = 0.5) -> None:
        super().__init__()
        if num_parts < 1:
            raise ValueError(f"TSD needs at least one part, got {num_parts}")
        if teacher_mask not in ("sampled", "target"):
            raise ValueError(f"tsd.teacher_mask must be 'sampled' or 'target', got {teacher_mask!r}")
        dim = backbone.embed_dim
        self.backbone, self.num_parts, self.dim = backbone, num_parts, dim
        self.teacher_mask, self.visibility_threshold = teacher_mask, visibility_threshold
        self.global_neck, self.global_classifier = make_bnneck(dim), make_classifier(dim, num_classes)
        self.memory_norm = nn.LayerNorm(dim)
        self.decoder = PartDecoder(dim, decoder_heads, ffn_ratio)
        self.query_embedding = nn.Parameter(torch.zeros(num_parts + 1, dim))
        trunc_normal_(self.query_embedding, std=dim ** -0.5)
        self.part_neck, self.part_classifier = make_bnneck(num_parts * dim), make_classifier(num_parts * dim, num_classes)
        self.visibility_head = TokenPartClassifier(dim, 1)
        self.pixel_classifier = TokenPartClassifier(dim, num_parts + 1)
        self.pooled_neck = make_bnneck(num_parts * dim)
        self.pooled_classifier = make_classifier(num_parts * dim, num_classes)
        self.with_fore_head = with_fore_head
        if with_fore_head:
            self.fore_neck, self.fore_classifier = make_bnneck(dim), make_classifier(dim, num_classes)

    @property
    def feature_dim(self) -> int:
        """Width of an eval row: 1 + P embeddings and their visibility scores."""
        return (1 + self.num_parts) * (self.dim + 1)

    def token_grid(self, images: Tensor) -> tuple[int, int]:
        return self.backbone.patch_embed.grid_size(images.shape[2], images.shape[3])

    def decode(self, memory: Tensor, cls_token: Tensor, mask: Tensor | None = None) -> Tensor:
        """Part features ``(B, P, D)`` from LN'd patch tokens and the LN'd [CLS] (detached here)."""
        queries = self.query_embedding.unsqueeze(0).expand(memory.shape[0], -1, -1)
        queries = torch.cat([cls_token.detach(), queries.to(memory.dtype)], dim=1)
        return self.decoder(queries, memory, mask)[:, 1:]

    def parsing_targets(self, masks: Tensor, grid: tuple[int, int]) -> Tensor:
        """``(B, N)`` argmax of the target masks resized (bilinear, corners aligned) to the token grid."""
        if masks.ndim != 4 or masks.shape[1] != self.num_parts + 1:
            raise ValueError(f"tsd: training masks must be (B, {self.num_parts + 1}, H, W) = background + "
                             f"{self.num_parts} parts, got {tuple(masks.shape)}; check data.mask_preprocess")
        resized = F.interpolate(masks.float(), size=grid, mode="bilinear", align_corners=True)
        return resized.argmax(dim=1).flatten(1)

    def forward(self, images: Tensor, camids: Tensor | None = None,
                masks: Tensor | None = None) -> TSDTrainOutput | Tensor:
        leading = self.backbone.num_leading_tokens()
        share = self.backbone.forward_until(images, self.backbone.depth - 1)
        b1 = self.backbone.norm(self.backbone.blocks[-1](share))
        global_feature, spatial = b1[:, 0], b1[:, leading:]
        pixel_logits = self.pixel_classifier(spatial)  # (B, N, P+1)
        pi = pixel_logits.float().softmax(dim=-1).to(spatial.dtype)
        memory = self.memory_norm(share)
        patch_memory, cls_memory = memory[:, leading:], memory[:, :1]
        parts = self.decode(patch_memory, cls_memory)
        bn_parts = self.part_neck(parts.flatten(1))
        visibility_logits = self.visibility_head(parts)[..., 0]
        bn_global = self.global_neck(global_feature)
        if not self.training:
            visible = (visibility_logits.sigmoid() > self.visibility_threshold).to(parts.dtype)
            rows = torch.cat([bn_global.unsqueeze(1), bn_parts.view(-1, self.num_parts, self.dim)], dim=1)
            return pack_part_rows(rows, torch.cat([torch.ones_like(visible[:, :1]), visible], dim=1))
        if masks is None:
            raise ValueError("tsd: the training forward needs the batch's parsing masks (masks=...)")
        targets = self.parsing_targets(masks, self.token_grid(images))
        onehot = F.one_hot(targets, self.num_parts + 1).to(pi.dtype)  # (B, N, P+1)
        if self.teacher_mask == "sampled":
            teacher_mask = (torch.rand_like(pi) < pi).to(pi.dtype).transpose(1, 2)
        else:
            teacher_mask = onehot.transpose(1, 2)
        teacher = self.decode(patch_memory, cls_memory, teacher_mask)
        parts_pi = pi[..., 1:]
        pooled = weighted_part_pooling(spatial, parts_pi)
        logits = {"global": self.global_classifier(bn_global),
                  "cat": self.part_classifier(bn_parts),
                  "cat_m": self.pooled_classifier(self.pooled_neck(pooled.flatten(1))),
                  "aux": self.part_classifier(self.part_neck(teacher.flatten(1)))}
        if self.with_fore_head:
            fore = weighted_part_pooling(spatial, parts_pi.sum(dim=-1, keepdim=True))[:, 0]
            logits["fg"] = self.fore_classifier(self.fore_neck(fore))
        return TSDTrainOutput(
            logits=logits, global_feature=global_feature,
            parts={"part": parts, "part_m": pooled, "aux": teacher,
                   "part_md": weighted_part_pooling(spatial, parts_pi.detach())},
            visibility_logits=visibility_logits, visibility_targets=onehot.amax(dim=1)[:, 1:],
            pixel_logits=pixel_logits, pixel_targets=targets)


# ------------------------------------------------------------------------------------------- losses


def part_averaged_soft_triplet_loss(parts: Tensor, labels: Tensor) -> Tensor:
    """TSD's ``part_weight_triplet_loss`` without weights: per-part Euclidean distances (sqrt, clamped at 1e-12)
    averaged over the P parts, then batch-hard mining (hardest positive itself included, as in
    :func:`~passreid.losses.reid.batch_hard_triplet_loss`) and the soft margin ``log(1 + exp(d_ap - d_an))``."""
    if parts.ndim != 3 or labels.shape != (parts.shape[0],):
        raise ValueError(f"expected parts (B, P, D) and labels (B,), got {tuple(parts.shape)}, {tuple(labels.shape)}")
    dist = torch.stack([euclidean_dist(parts[:, k], parts[:, k]) for k in range(parts.shape[1])]).mean(dim=0)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    if bool(same.all()):
        raise ValueError("triplet loss needs at least two identities in the batch (no negatives found)")
    hardest_positive = dist.masked_fill(~same, float("-inf")).amax(dim=1)
    hardest_negative = dist.masked_fill(same, float("inf")).amin(dim=1)
    return F.softplus(hardest_positive - hardest_negative).mean()


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Mean sigmoid focal loss (Lin et al.; torchvision's ``sigmoid_focal_loss`` with ``reduction='mean'``)."""
    logits, targets = logits.float(), targets.float()
    probability = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probability * targets + (1 - probability) * (1 - targets)
    loss = loss * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean()


def parsing_loss(pixel_logits: Tensor, targets: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """TSD's parsing CE over pixels: target ``1 - eps`` on the true class and ``eps / (C - 1)`` on the others,
    summed over pixels and divided by the number of pixels with a non-zero loss.
    ``pixel_logits (B, N, C)``, ``targets (B, N)``."""
    logits = pixel_logits.float().flatten(0, 1)
    num_classes = logits.shape[1]
    log_probs = logits.log_softmax(dim=1)
    with torch.no_grad():
        soft = torch.full_like(log_probs, label_smoothing / (num_classes - 1))
        soft.scatter_(1, targets.flatten().unsqueeze(1), 1 - label_smoothing)
    loss = -(soft * log_probs).sum(dim=1)
    return loss.sum() / max(int(torch.count_nonzero(loss.detach())), 1)


def diversity_loss(parts: Tensor, groups: tuple[int, ...] | None = None) -> Tensor:
    """``mean relu(cos(p_k, p_l))`` over part pairs of different groups (k != l by default): per part the mean
    over its allowed partners, then the mean over parts and images. ``parts (B, P, D)``."""
    batch, count, _ = parts.shape
    groups = tuple(range(count)) if groups is None else tuple(groups)
    if len(groups) != count:
        raise ValueError(f"diversity groups {groups} do not match {count} parts")
    group = torch.tensor(groups, device=parts.device)
    allowed = (group.unsqueeze(0) != group.unsqueeze(1)).to(parts.dtype)
    if not bool(allowed.any()):
        return parts.sum() * 0.0
    unit = F.normalize(parts.float(), dim=-1)
    similarity = (unit @ unit.transpose(1, 2)).relu()
    per_part = (similarity * allowed).sum(-1) / allowed.sum(-1).clamp(min=1)
    rows = allowed.sum(-1) > 0
    return per_part[:, rows].mean()


class TSDCriterion(nn.Module):
    """All TSD terms (module docstring). Returns ``loss`` (weighted total), every term unweighted, ``acc``."""

    def __init__(self, id_weight: float = 1.0, triplet_weight: float = 1.0, visibility_weight: float = 1.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, mimic_weight: float = 1.0,
                 parsing_weight: float = 1.0, parsing_label_smoothing: float = 0.1, diversity_weight: float = 1.0,
                 diversity_groups: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.weights = {"id": id_weight, "triplet": triplet_weight, "visibility": visibility_weight,
                        "mimic": mimic_weight, "parsing": parsing_weight, "diversity": diversity_weight}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.parsing_label_smoothing = parsing_label_smoothing
        self.diversity_groups = diversity_groups

    def forward(self, output: TSDTrainOutput, targets: Tensor) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {f"id_{name}": identity_loss(logits, targets) for name, logits in output.logits.items()}
        terms["triplet_global"] = batch_hard_triplet_loss(output.global_feature, targets)
        for name in ("part", "part_m", "aux"):
            terms[f"triplet_{name}"] = part_averaged_soft_triplet_loss(output.parts[name], targets)
        terms["visibility"] = sigmoid_focal_loss(output.visibility_logits, output.visibility_targets,
                                                 self.focal_alpha, self.focal_gamma)
        student = F.normalize(output.parts["part"].flatten(1).float(), dim=1)
        teacher = F.normalize(output.parts["aux"].flatten(1).float(), dim=1).detach()
        terms["mimic"] = (1 - (student * teacher).sum(dim=1)).mean()
        terms["parsing"] = parsing_loss(output.pixel_logits, output.pixel_targets, self.parsing_label_smoothing)
        if self.weights["diversity"] > 0:
            terms["diversity"] = (diversity_loss(output.parts["aux"], self.diversity_groups)
                                  + diversity_loss(output.parts["part_md"], self.diversity_groups))
        total = sum(self.weights[name.split("_")[0]] * value for name, value in terms.items())
        with torch.no_grad():
            accuracy = (output.logits["global"].argmax(dim=1) == targets).float().mean()
        return {"loss": total, **terms, "acc": accuracy}


# ------------------------------------------------------------------------------------------ method


def build_tsd_model(cfg: FinetuneConfig, num_classes: int, num_cameras: int, load_weights: bool = True) -> TSDModel:
    """ViT of ``cfg.model`` (+ pretrained weights) with TSD's heads for ``data.mask_preprocess``'s P parts."""
    if cfg.model.sie_camera or cfg.model.jpm:
        raise ValueError("method tsd does not combine with model.sie_camera or model.jpm (the recipe uses neither)")
    backbone = build_backbone(cfg.model)
    if load_weights:
        load_backbone_weights(backbone, cfg.model)
    t = cfg.tsd
    return TSDModel(backbone, num_classes, num_parts(cfg.data.mask_preprocess), t.decoder_heads, t.ffn_ratio,
                    t.with_fore_head, t.teacher_mask, t.visibility_threshold)


def build_tsd_criterion(cfg: FinetuneConfig) -> TSDCriterion:
    t = cfg.tsd
    return TSDCriterion(t.id_weight, t.triplet_weight, t.visibility_weight, t.focal_alpha, t.focal_gamma,
                        t.mimic_weight, t.parsing_weight, t.parsing_label_smoothing, t.diversity_weight,
                        DIVERSITY_PART_GROUPS.get(cfg.data.mask_preprocess))


def build_tsd_test_distance(cfg: FinetuneConfig, query: ExtractedFeatures, gallery: ExtractedFeatures,
                            device: torch.device | None = None) -> VisiblePartDistance:
    """``sqrt(v_q v_g)``-weighted mean of per-part L2 distances over ``[BN(g), BN parts]``, global always visible."""
    num_embeddings = num_parts(cfg.data.mask_preprocess) + 1
    q_parts, q_vis = unpack_part_rows(torch.as_tensor(query.feats), num_embeddings)
    g_parts, g_vis = unpack_part_rows(torch.as_tensor(gallery.feats), num_embeddings)
    return VisiblePartDistance(q_parts, q_vis, g_parts, g_vis, visibility="weighted", normalize=True,
                               always_visible=(0,), device=device)


def occlusion_benchmark(model: nn.Module, cfg: FinetuneConfig, dataset, device: torch.device,
                        variants: tuple[str, ...] = ("ALL", "NPO", "NTP")) -> dict:
    """TSD's holistic-query benchmark: ``{variant: RankResult}`` for a model of any method on a dataset read by
    ``occluded_duke_tsd`` (gallery labels from its ``new_gallery.txt``), with the method's own test distance."""
    from passreid.data.datasets import occlusion_labels_for, read_tsd_gallery_labels
    from passreid.eval.distance import FeatureDistance
    from passreid.eval.evaluator import extract_split
    from passreid.eval.occlusion_variants import occlusion_variant_metrics
    from passreid.finetune.methods import get_method

    size = tuple(cfg.model.img_size)
    query = extract_split(model, dataset.query, size, cfg, device, split="query")
    gallery = extract_split(model, dataset.gallery, size, cfg, device, split="gallery")
    labels = occlusion_labels_for(dataset.gallery, read_tsd_gallery_labels(dataset.root))
    builder = get_method(cfg.method).build_test_distance

    def distance_for(index):
        subset = ExtractedFeatures(query.feats[index], query.pids[index], query.camids[index])
        if builder is not None:
            return builder(cfg, subset, gallery, device)
        return FeatureDistance(subset.feats, gallery.feats, metric=cfg.eval.metric, device=device)

    return {variant: occlusion_variant_metrics(distance_for, query.pids, gallery.pids, query.camids, gallery.camids,
                                               labels, variant, max_rank=cfg.eval.max_rank, device=device)
            for variant in variants}


def main(argv: list[str] | None = None) -> int:
    """``python -m passreid.finetune.tsd --weights model_final.pth --data-root DIR``: ALL / NPO / NTP tables."""
    import argparse

    from passreid.data import build_dataset
    from passreid.engine import select_device
    from passreid.finetune.checkpoints import load_finetuned_model

    parser = argparse.ArgumentParser(description="TSD's holistic-query Occluded-Duke benchmark (ALL / NPO / NTP)")
    parser.add_argument("--weights", required=True, help="model_final.pth or checkpoint.pth of a fine-tuning run")
    parser.add_argument("--data-root", required=True, help="Occluded_Duke/ (with new_query.txt, new_gallery.txt) "
                                                           "or its parent")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    model, cfg, _ = load_finetuned_model(args.weights)
    device = select_device(args.device)
    results = occlusion_benchmark(model.to(device), cfg, build_dataset("occluded_duke_tsd", args.data_root), device)
    for variant, result in results.items():
        print(f"{variant} ({result.num_valid_queries} valid queries)\n{result.format_table()}")
    return 0


def validate_tsd_config(cfg: FinetuneConfig) -> None:
    """The ``tsd`` section's ranges (a :class:`ConfigError` naming the key)."""
    tsd = cfg.tsd
    require(all(w >= 0 for w in (tsd.id_weight, tsd.triplet_weight, tsd.visibility_weight, tsd.mimic_weight,
                                 tsd.parsing_weight, tsd.diversity_weight)), "tsd.id_weight",
            "TSD loss weights must be >= 0")


# ``python -m passreid.finetune.tsd`` runs this file as __main__ after the package registered the method.
if __name__ != "__main__":
    register_method(
        FinetuneMethod(
            name="tsd",
            description="TSD (ICASSP'24): shared part-query decoder, teacher pass masked by sampled parsing, "
                        "distillation, visibility / parsing / diversity losses, visibility-weighted part distance",
            build_model=build_tsd_model,
            build_criterion=build_tsd_criterion,
            build_test_distance=build_tsd_test_distance,
            sie_and_jpm=False,
            train_masks=lambda cfg: "parsing",
            validate=validate_tsd_config,
            section="tsd",
            section_type=TSDConfig,
        )
    )


if __name__ == "__main__":
    from passreid.finetune.tsd import main as _registered_main

    raise SystemExit(_registered_main())
