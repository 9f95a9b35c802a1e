"""DPEFormer (Zhang et al., arXiv 2402.10435), as the fine-tuning method ``method: dpeformer``.

Checked against the released code (DPEFormer, zhangxin06/DPEFormer: model/make_model_zx.py,
model/backbones/vit_pytorch.py, model/hm.py, datasets/bases.py). The paper's method is the default;
three switches reproduce the released code where it differs:

* ``dpeformer.global_token``: ``cls`` (paper: the [CLS] token) or ``first_patch`` (the released code's ``x[:, 1]``,
  the first patch token after the final LN);
* ``dpeformer.view2``: ``occluder`` (paper: realistic occlusion augmentation, an occluder cut-out pasted onto view 1;
  the paper pastes SAM segments of SA-1B at a corner, here the cut-outs of ``data.occluder_dir`` are pasted with
  :class:`~passreid.data.occluders.OccluderPaste`, always, area ``data.occluder_area``, placed uniformly) or
  ``erasing`` (released: random erasing of view 1, p 1, area 0.05-0.4, per-pixel N(0, 1) noise);
* ``dpeformer.fbm_head_merge``: ``per_image`` (paper: each image's attention heads are put back together) or
  ``released_batch_mix``: the released code's head merge (zhangxin06/DPEFormer, model/backbones/vit_pytorch.py,
  ``Attention_part_global_new.forward``, lines 593 and 602 at 2f64361: ``q`` is reshaped to ``(B, N, 1, H, d)``
  and permuted, which gives it an extra leading axis of size 1, so the attention output is 5-D and
  ``(attn @ v).transpose(1, 2)`` swaps the batch and head axes instead of the token and head axes before
  ``reshape(B, N, C)``). The result is read heads-major across the batch: with the published 2 heads and an
  even batch, output image ``i < B/2`` holds head 0 of images ``2i`` and ``2i + 1``, image ``i >= B/2`` head 1
  of images ``2i - B`` and ``2i - B + 1`` (:func:`merge_heads`). An image's enriched parts then depend on which
  images share its batch, at test time too; the mode exists only to reproduce models trained with that code.

Model (on the final-LN tokens of the ViT; ``g`` the global token, ``t_1..t_N`` the patch tokens):

* **Stripes**: ``AdaptiveAvgPool1d(4)`` over the patch tokens in raster order (4 horizontal bands), one BN neck
  each; their concatenation ``x1_bn`` (4D) has a classifier.
* **DPSM** (:func:`dynamic_patch_selection`): ``anchor = argmax_n <g, t_n>``; ``s_n = <t_anchor, t_n>`` sorted in
  descending order; ``k_b`` = the position of the largest first difference ``s_(i) - s_(i+1)`` (0-based, as
  released), clipped to at least ``dpeformer.min_selected`` (24 for the 16x8 grid of 256x128; scale it with the
  grid, e.g. 6 for the 8x4 demo grid); the top ``k_b`` tokens, in that order, are average-pooled to the batch's
  smallest ``k`` and then to 4 parts.
* **FBM** (:class:`FeatureBlendingModule`, one per part): the part and ``g`` are read as ``D/16`` tokens of 16
  dims plus a learned position embedding (zero init); pre-LN cross-attention (2 heads, queries from the part,
  keys/values from ``g``, no qkv bias) and an MLP (ratio 1, GELU), both residual; flattened back. A BN neck per
  part; the concatenation ``x1_new`` (4D) has a classifier and each BN'd part its own.
* **Global classifier**: ``Linear(D, C)`` on the raw ``g`` (no BN).
* **Memory** (:class:`ClassCentroidMemory`): a class-centroid bank ``(C, 4D)`` of ``x1_bn``, initialised with the
  normalised class means of the training set (a pass in eval mode with the test transform when the model is
  built for a new run), logits ``cos(x, bank) / 0.05``; view 1 updates its rows ``m * row + (1 - m) * x``
  (m 0.2, renormalised, one sample at a time), view 2 does not.

Loss (CE without label smoothing, no triplet; :class:`DPEFormerCriterion`):
``mean CE[stripes(v1), stripes(v2), parts(v1), parts(v2)] + 2 mean CE[global(v1), global(v2)]
+ mean CE[8 per-part classifiers] + L_mem(v1) + 0.3 L_mem(v2)``.
Test feature: ``x1_new`` (the enriched parts), L2-normalised Euclidean distance (``eval.metric``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision import transforms as T

from passreid import dist
from passreid.config import ConfigError, require
from passreid.data import ImageItem
from passreid.data.occluders import OccluderPaste
from passreid.data.reid_sets import resolve_occluder_dir
from passreid.data.samplers import ImageDataset
from passreid.data.transforms import RandomErasing
from passreid.finetune.methods import FinetuneMethod, register_method
from passreid.losses.reid import identity_loss
from passreid.models import VisionTransformer
from passreid.models.factory import build_backbone, load_backbone_weights
from passreid.models.reid import make_bnneck, make_classifier

if TYPE_CHECKING:  # annotations only: passreid.finetune.config imports this module for its section
    from passreid.finetune.config import FinetuneConfig

__all__ = [
    "ClassCentroidMemory",
    "DPEFormerConfig",
    "DPEFormerCriterion",
    "DPEFormerModel",
    "DPEFormerTrainOutput",
    "FeatureBlendingModule",
    "TwoViewDataset",
    "dynamic_patch_selection",
    "merge_heads",
    "selection_sizes",
]


@dataclass
class DPEFormerConfig:
    """DPEFormer (``method: dpeformer``; arXiv 2402.10435). Defaults are the paper's method."""

    # Global token g of DPSM/FBM and of the global classifier: "cls" = [CLS] (paper); "first_patch" = the first
    # patch token x[:, 1] after the final LN (what the released code takes).
    global_token: Literal["cls", "first_patch"] = "cls"
    # View 2 of each sample: "occluder" = view 1 with an occluder cut-out pasted (the paper's realistic occlusion
    # augmentation; cut-outs from data.occluder_dir, area data.occluder_area, always applied); "erasing" = random
    # erasing of view 1 (p 1, area erasing_area, pixel noise), what the released code does.
    view2: Literal["occluder", "erasing"] = "occluder"
    erasing_area: tuple[float, float] = (0.05, 0.4)
    num_parts: int = 4  # stripes and DPSM parts
    min_selected: int = 24  # DPSM: the first-difference cut k_b is clipped to >= this (24 of 128 tokens at 256x128)
    fbm_token_dim: int = 16  # FBM: a D-dim part / global vector is read as D / 16 tokens of 16 dims
    fbm_heads: int = 2
    fbm_mlp_ratio: float = 1.0
    # FBM head merge: "per_image" (paper); "released_batch_mix" = the released code's transpose/reshape, which mixes
    # the heads of pairs of images of a batch, so features depend on the batch (only to reproduce released models).
    fbm_head_merge: Literal["per_image", "released_batch_mix"] = "per_image"
    global_id_weight: float = 2.0  # weight of the mean CE of the two global classifiers
    memory_temperature: float = 0.05
    memory_momentum: float = 0.2  # bank row <- m * row + (1 - m) * feature, renormalised (view 1 only)
    memory_weight: float = 1.0  # memory loss of view 1 (updates the bank)
    memory_weight_view2: float = 0.3  # memory loss of view 2 (no update)


HEAD_MERGES = ("per_image", "released_batch_mix")

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- DPSM


def selection_sizes(global_token: Tensor, patches: Tensor, min_selected: int) -> tuple[Tensor, Tensor]:
    """Per image: the patch order by similarity to the anchor ``(B, N)`` and ``k_b`` ``(B,)`` (module docstring)."""
    anchor = torch.einsum("bd,bnd->bn", global_token, patches).argmax(dim=1)
    anchor_token = patches[torch.arange(patches.shape[0], device=patches.device), anchor]
    similarity = torch.einsum("bd,bnd->bn", anchor_token, patches)
    ordered, order = similarity.sort(dim=1, descending=True)
    difference = ordered - torch.cat([ordered[:, 1:], ordered[:, -1:]], dim=1)
    return order, difference.argmax(dim=1).clamp(min=min_selected)


@torch.no_grad()
def _selection(global_token: Tensor, patches: Tensor, min_selected: int) -> tuple[Tensor, Tensor]:
    return selection_sizes(global_token.float(), patches.float(), min_selected)


def dynamic_patch_selection(global_token: Tensor, patches: Tensor, min_selected: int = 24,
                            num_parts: int = 4) -> Tensor:
    """DPSM: ``(B, D)`` global token, ``(B, N, D)`` patches -> ``(B, num_parts, D)`` parts (module docstring)."""
    if not num_parts <= min_selected <= patches.shape[1]:
        raise ValueError(f"dpeformer.min_selected must be in [{num_parts}, {patches.shape[1]}] (parts, patch tokens), "
                         f"got {min_selected}")
    order, sizes = _selection(global_token, patches, min_selected)
    common = int(sizes.min())
    parts = []
    for b in range(patches.shape[0]):
        chosen = patches[b, order[b, : int(sizes[b])]]  # (k_b, D), most similar first
        pooled = F.adaptive_avg_pool1d(chosen.t().unsqueeze(0), common)
        parts.append(F.adaptive_avg_pool1d(pooled, num_parts)[0].t())
    return torch.stack(parts)


# -------------------------------------------------------------------------------------------- FBM


def merge_heads(heads: Tensor, mode: str = "per_image") -> Tensor:
    """Attention output ``(B, H, T, d)`` -> ``(B, T, H*d)``.

    ``per_image``: token ``t`` of image ``b`` is ``cat_h heads[b, h, t]``. ``released_batch_mix``: the released
    code's layout, the buffer ordered ``(h, b, t, d)`` read as ``(B, T, H*d)``, which mixes images (module docstring).
    """
    batch, num_heads, length, _ = heads.shape
    if mode == "per_image":
        return heads.transpose(1, 2).reshape(batch, length, -1)
    if mode == "released_batch_mix":
        return heads.transpose(0, 1).reshape(batch, length, -1)
    raise ValueError(f"dpeformer.fbm_head_merge must be one of {HEAD_MERGES}, got {mode!r}")


class FeatureBlendingModule(nn.Module):
    """FBM for one part: ``(B, D)`` part, ``(B, D)`` global -> ``(B, D)`` enriched part (module docstring)."""

    def __init__(self, dim: int, token_dim: int = 16, num_heads: int = 2, mlp_ratio: float = 1.0,
                 head_merge: str = "per_image") -> None:
        super().__init__()
        if dim % token_dim or token_dim % num_heads:
            raise ValueError(f"FBM: width {dim} must split into tokens of {token_dim} dims and {num_heads} heads")
        if head_merge not in HEAD_MERGES:
            raise ValueError(f"dpeformer.fbm_head_merge must be one of {HEAD_MERGES}, got {head_merge!r}")
        self.head_merge = head_merge
        self.num_tokens, self.token_dim, self.num_heads = dim // token_dim, token_dim, num_heads
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, token_dim))
        self.norm_part, self.norm_global, self.norm_mlp = (nn.LayerNorm(token_dim) for _ in range(3))
        self.q = nn.Linear(token_dim, token_dim, bias=False)
        self.kv = nn.Linear(token_dim, 2 * token_dim, bias=False)
        self.proj = nn.Linear(token_dim, token_dim)
        hidden = int(token_dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(token_dim, hidden), nn.GELU(), nn.Linear(hidden, token_dim))
        self.scale = (token_dim // num_heads) ** -0.5

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        return x.reshape(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def cross_attention(self, part: Tensor, global_: Tensor) -> Tensor:
        q = self._heads(self.q(part))
        k, v = (self._heads(t) for t in self.kv(global_).chunk(2, dim=-1))
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj(merge_heads(attn @ v, self.head_merge))

    def forward(self, part: Tensor, global_token: Tensor) -> Tensor:
        batch = part.shape[0]
        x = part.reshape(batch, self.num_tokens, self.token_dim) + self.pos_embed
        g = global_token.reshape(batch, self.num_tokens, self.token_dim) + self.pos_embed
        x = x + self.cross_attention(self.norm_part(x), self.norm_global(g))
        x = x + self.mlp(self.norm_mlp(x))
        return x.reshape(batch, -1)


# ------------------------------------------------------------------------------------------ memory


class ClassCentroidMemory(nn.Module):
    """Class-centroid bank ``(C, F)`` (unit rows, a buffer: saved with the model) with temperature and momentum."""

    def __init__(self, num_classes: int, dim: int, temperature: float = 0.05, momentum: float = 0.2) -> None:
        super().__init__()
        self.temperature, self.momentum = temperature, momentum
        self.register_buffer("features", torch.zeros(num_classes, dim))

    @torch.no_grad()
    def initialise(self, features: Tensor, labels: Tensor) -> None:
        """Rows = normalised class means of ``features (M, F)`` with ``labels (M,)``; every class must occur."""
        sums = torch.zeros_like(self.features).index_add_(0, labels, features.to(self.features))
        counts = torch.bincount(labels, minlength=self.features.shape[0])
        if bool((counts == 0).any()):
            missing = torch.nonzero(counts == 0).flatten().tolist()[:5]
            raise ValueError(f"memory initialisation: classes {missing} have no feature")
        self.features.copy_(F.normalize(sums / counts.unsqueeze(1), dim=1))

    def logits(self, features: Tensor) -> Tensor:
        """``cos(x, bank) / temperature``: ``(B, C)`` (a snapshot of the bank: the update after scoring must not
        change what the backward pass sees)."""
        return F.normalize(features.float(), dim=1) @ self.features.clone().t() / self.temperature

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """For each sample in order: ``row[y] <- m row[y] + (1 - m) normalize(x)``, then renormalise the row."""
        features = F.normalize(features.float(), dim=1)
        for feature, label in zip(features, labels.tolist()):
            row = self.momentum * self.features[label] + (1 - self.momentum) * feature
            self.features[label] = row / row.norm().clamp(min=1e-12)


# ------------------------------------------------------------------------------------------- model


@dataclass
class DPEFormerTrainOutput:
    """Per view (v1, v2): classifier logits, stripe features ``x1_bn``; plus the memory to score them with."""

    concat_logits: list[Tensor]  # [stripes(v1), stripes(v2), parts(v1), parts(v2)] (B, C)
    global_logits: list[Tensor]  # [global(v1), global(v2)]
    part_logits: list[Tensor]  # 4 per-part classifiers of v1, then of v2
    stripes: list[Tensor]  # x1_bn of v1, v2: (B, 4D)
    memory: ClassCentroidMemory


class DPEFormerModel(nn.Module):
    """ViT + DPEFormer heads. ``forward(images, camids=None, view2=None)``: a :class:`DPEFormerTrainOutput` in
    training mode (``view2`` required), the test feature ``x1_new`` (B, 4D) in eval mode."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, global_token: str = "cls", num_parts: int = 4,
                 min_selected: int = 24, fbm_token_dim: int = 16, fbm_heads: int = 2, fbm_mlp_ratio: float = 1.0,
                 memory_temperature: float = 0.05, memory_momentum: float = 0.2,
                 fbm_head_merge: str = "per_image") -> None:
        super().__init__()
        if global_token not in ("cls", "first_patch"):
            raise ValueError(f"dpeformer.global_token must be 'cls' or 'first_patch', got {global_token!r}")
        dim = backbone.embed_dim
        self.backbone, self.num_parts, self.dim = backbone, num_parts, dim
        self.global_token, self.min_selected = global_token, min_selected
        self.stripe_necks = nn.ModuleList(make_bnneck(dim) for _ in range(num_parts))
        self.part_necks = nn.ModuleList(make_bnneck(dim) for _ in range(num_parts))
        self.blending = nn.ModuleList(FeatureBlendingModule(dim, fbm_token_dim, fbm_heads, fbm_mlp_ratio,
                                                            fbm_head_merge) for _ in range(num_parts))
        self.stripe_classifier = make_classifier(num_parts * dim, num_classes)
        self.part_concat_classifier = make_classifier(num_parts * dim, num_classes)
        self.part_classifiers = nn.ModuleList(make_classifier(dim, num_classes) for _ in range(num_parts))
        self.global_classifier = make_classifier(dim, num_classes)
        self.memory = ClassCentroidMemory(num_classes, num_parts * dim, memory_temperature, memory_momentum)

    @property
    def feature_dim(self) -> int:
        return self.num_parts * self.dim

    def tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``g (B, D)`` and the patch tokens ``(B, N, D)`` after the final LN."""
        tokens = self.backbone.forward_tokens(images)
        patches = tokens[:, self.backbone.num_leading_tokens():]
        return (tokens[:, 0] if self.global_token == "cls" else patches[:, 0]), patches

    def stripe_features(self, patches: Tensor) -> Tensor:
        """``x1_bn``: BN'd horizontal-band averages, concatenated ``(B, 4D)``."""
        stripes = F.adaptive_avg_pool1d(patches.transpose(1, 2), self.num_parts).transpose(1, 2)
        return torch.cat([neck(stripes[:, k]) for k, neck in enumerate(self.stripe_necks)], dim=1)

    def part_features(self, global_token: Tensor, patches: Tensor) -> list[Tensor]:
        """BN'd enriched parts (DPSM + FBM), one ``(B, D)`` per part; their concatenation is ``x1_new``."""
        parts = dynamic_patch_selection(global_token, patches, self.min_selected, self.num_parts)
        return [neck(blend(parts[:, k], global_token))
                for k, (blend, neck) in enumerate(zip(self.blending, self.part_necks))]

    def _view(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        global_token, patches = self.tokens(images)
        stripes = self.stripe_features(patches)
        parts = self.part_features(global_token, patches)
        return global_token, stripes, torch.cat(parts, dim=1), parts

    def forward(self, images: Tensor, camids: Tensor | None = None,
                view2: Tensor | None = None) -> DPEFormerTrainOutput | Tensor:
        if not self.training:
            global_token, patches = self.tokens(images)
            return torch.cat(self.part_features(global_token, patches), dim=1)
        if view2 is None:
            raise ValueError("dpeformer: the training forward needs the second view of each sample (view2=...); "
                             "the training set of method dpeformer provides it")
        views = [self._view(images), self._view(view2)]
        return DPEFormerTrainOutput(
            concat_logits=[self.stripe_classifier(v[1]) for v in views]
            + [self.part_concat_classifier(v[2]) for v in views],
            global_logits=[self.global_classifier(v[0]) for v in views],
            part_logits=[classifier(v[3][k]) for v in views for k, classifier in enumerate(self.part_classifiers)],
            stripes=[v[1] for v in views],
            memory=self.memory,
        )


# ------------------------------------------------------------------------------------------- losses


class DPEFormerCriterion(nn.Module):
    """DPEFormer's loss (module docstring); updates the memory with view 1 after scoring both views. Returns
    ``loss``, the unweighted terms ``id_concat``, ``id_global``, ``id_parts``, ``memory``, ``memory_view2`` and ``acc``."""

    def __init__(self, global_id_weight: float = 2.0, memory_weight: float = 1.0,
                 memory_weight_view2: float = 0.3, gather_memory_update: bool = True) -> None:
        super().__init__()
        self.global_id_weight, self.memory_weight, self.memory_weight_view2 = (global_id_weight, memory_weight,
                                                                               memory_weight_view2)
        # False when the criterion already receives the global batch (train.ddp_batch=global): no second gather.
        self.gather_memory_update = gather_memory_update

    @staticmethod
    def _mean_ce(logits: list[Tensor], targets: Tensor) -> Tensor:
        return torch.stack([identity_loss(value, targets) for value in logits]).mean()

    def forward(self, output: DPEFormerTrainOutput, targets: Tensor) -> dict[str, Tensor]:
        memory = output.memory
        terms = {"id_concat": self._mean_ce(output.concat_logits, targets),
                 "id_global": self._mean_ce(output.global_logits, targets),
                 "id_parts": self._mean_ce(output.part_logits, targets),
                 "memory": F.cross_entropy(memory.logits(output.stripes[0]), targets),
                 "memory_view2": F.cross_entropy(memory.logits(output.stripes[1]), targets)}
        total = (terms["id_concat"] + self.global_id_weight * terms["id_global"] + terms["id_parts"]
                 + self.memory_weight * terms["memory"] + self.memory_weight_view2 * terms["memory_view2"])
        if torch.is_grad_enabled():  # a training step: view 1 updates the bank (view 2 has momentum 1)
            features, labels = output.stripes[0].detach(), targets
            if self.gather_memory_update:  # every rank updates its bank with all ranks' samples: banks stay equal
                features, labels = dist.all_gather_with_grad(features), dist.all_gather_with_grad(labels)
            memory.update(features, labels)
        with torch.no_grad():
            accuracy = (output.global_logits[0].argmax(dim=1) == targets).float().mean()
        return {"loss": total, **terms, "acc": accuracy}


# ------------------------------------------------------------------------------------------- data


class TwoViewDataset(Dataset):
    """``dict(img=view 1, view2=view 2, pid, camid, index)``: view 1 = resize (+ colour jitter) + flip + pad +
    crop (PIL), view 2 = ``second(view 1 PIL)`` (occluder paste) or ``erase(view 1 tensor)``; both normalised."""

    def __init__(self, items: list[ImageItem], geometry: T.Compose, to_tensor: T.Compose,
                 occluder: OccluderPaste | None = None, erasing: RandomErasing | None = None) -> None:
        if (occluder is None) == (erasing is None):
            raise ValueError("TwoViewDataset needs exactly one of occluder / erasing for view 2")
        self.images = ImageDataset(items, transform=None)
        self.geometry, self.to_tensor, self.occluder, self.erasing = geometry, to_tensor, occluder, erasing

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        sample = self.images[index]
        view1 = self.geometry(sample["img"])
        img = self.to_tensor(view1)
        view2 = self.to_tensor(self.occluder(view1)) if self.occluder is not None else self.erasing(img.clone())
        return {**sample, "img": img, "view2": view2}


OCCLUDER_DIR_HELP = (
    "dpeformer.view2=occluder (the paper's realistic occlusion, the recipes' default) pastes cut-outs from a flat "
    "folder of RGBA *.png files (<dir>/<name>.png, alpha = the object). For the published SAM crops, download "
    "SA-1B-crop (linked from the README of zhangxin06/DPEFormer: sub-folders of RGB crops, black outside the "
    "segment), unpack it and run `python tools/prepare_occluders.py --source <SA-1B-crop> --output <dir>`, then "
    "set data.occluder_dir=<dir>. Without crops: dpeformer.view2=erasing (the released code's view 2) or "
    "data.occluder_dir=<world>/occluders (the demo world's cut-outs: `python -m passreid.demo --out DIR`, then "
    "DIR/world/occluders)"
)


def build_two_view_train_set(items: list[ImageItem], cfg: FinetuneConfig) -> TwoViewDataset:
    """DPEFormer's training samples from ``cfg.data`` / ``cfg.dpeformer`` (views as in the module docstring)."""
    data, d = cfg.data, cfg.dpeformer
    steps = [T.Resize(tuple(cfg.model.img_size), interpolation=T.InterpolationMode.BICUBIC)]
    if data.color_jitter:
        steps.append(T.ColorJitter(*data.color_jitter))
    steps += [T.RandomHorizontalFlip(p=data.flip_p), T.Pad(data.padding), T.RandomCrop(tuple(cfg.model.img_size))]
    to_tensor = T.Compose([T.ToTensor(), T.Normalize(data.pixel_mean, data.pixel_std)])
    if d.view2 == "occluder":
        if not data.occluder_dir:
            raise ConfigError(f"config key 'data.occluder_dir' is empty. {OCCLUDER_DIR_HELP}")
        folder = resolve_occluder_dir(cfg.data)
        if not Path(folder).expanduser().is_dir():
            raise ConfigError(f"config key 'data.occluder_dir': folder {folder} does not exist. {OCCLUDER_DIR_HELP}")
        paste = OccluderPaste(folder, p=1.0, area=tuple(data.occluder_area))
        logger.info("dpeformer view 2: occluder paste %r from %s", paste, folder)
        return TwoViewDataset(items, T.Compose(steps), to_tensor, occluder=paste)
    erasing = RandomErasing(1.0, min_area=d.erasing_area[0], max_area=d.erasing_area[1])
    logger.info("dpeformer view 2: %r", erasing)
    return TwoViewDataset(items, T.Compose(steps), to_tensor, erasing=erasing)


# ------------------------------------------------------------------------------------------ method


@torch.no_grad()
def initialise_memory(model: DPEFormerModel, cfg: FinetuneConfig) -> None:
    """Bank rows = class means of ``x1_bn`` over the training set (eval mode, test transform)."""
    from passreid.engine import select_device
    from passreid.eval.evaluator import build_test_loader
    from passreid.finetune.data import load_finetune_data

    device = select_device(cfg.train.device, dist.get_local_rank())
    train = load_finetune_data(cfg).train.train
    loader = build_test_loader(train, tuple(cfg.model.img_size), cfg)
    was_training = model.training
    model.to(device).eval()
    features, labels = [], []
    for batch in loader:
        _, patches = model.tokens(batch["img"].to(device))
        features.append(model.stripe_features(patches).float().cpu())
        labels.append(torch.as_tensor(batch["pid"]))
    model.memory.initialise(torch.cat(features).to(device), torch.cat(labels).to(device))
    model.cpu().train(was_training)
    logger.info("dpeformer memory: %d class centroids of x1_bn from %d training images", model.memory.features.shape[0],
                len(train))


def build_dpeformer_model(cfg: FinetuneConfig, num_classes: int, num_cameras: int,
                          load_weights: bool = True) -> DPEFormerModel:
    """ViT of ``cfg.model`` (+ pretrained weights) with DPEFormer's heads; for a new run (``load_weights``) the
    memory is initialised from the training set's class means (a resumed / loaded model restores it)."""
    if cfg.model.sie_camera or cfg.model.jpm:
        raise ValueError("method dpeformer does not combine with model.sie_camera or model.jpm (the paper uses neither)")
    d = cfg.dpeformer
    backbone = build_backbone(cfg.model)
    if load_weights:
        load_backbone_weights(backbone, cfg.model)
    model = DPEFormerModel(backbone, num_classes, d.global_token, d.num_parts, d.min_selected, d.fbm_token_dim,
                           d.fbm_heads, d.fbm_mlp_ratio, d.memory_temperature, d.memory_momentum, d.fbm_head_merge)
    if load_weights:
        initialise_memory(model, cfg)
    return model


def build_dpeformer_criterion(cfg: FinetuneConfig) -> DPEFormerCriterion:
    d = cfg.dpeformer
    return DPEFormerCriterion(d.global_id_weight, d.memory_weight, d.memory_weight_view2,
                              gather_memory_update=cfg.train.ddp_batch == "local")


def validate_dpeformer_config(cfg: FinetuneConfig) -> None:
    """The ``dpeformer`` section's ranges (a :class:`ConfigError` naming the key)."""
    dpe = cfg.dpeformer
    require(dpe.num_parts >= 1 and dpe.min_selected >= dpe.num_parts, "dpeformer.min_selected",
            f"must be >= dpeformer.num_parts ({dpe.num_parts}), got {dpe.min_selected}")
    require(0.0 < dpe.erasing_area[0] <= dpe.erasing_area[1] <= 1.0, "dpeformer.erasing_area",
            f"must be (min, max) with 0 < min <= max <= 1, got {dpe.erasing_area}")
    require(dpe.memory_temperature > 0 and 0.0 <= dpe.memory_momentum <= 1.0, "dpeformer.memory_momentum",
            "memory temperature must be > 0 and momentum in [0, 1]")


register_method(
    FinetuneMethod(
        name="dpeformer",
        description="DPEFormer: stripes + dynamic patch selection + feature blending with the global token, two views "
                    "(occluder paste or erasing), class-centroid memory; test feature = the enriched parts",
        build_model=build_dpeformer_model,
        build_criterion=build_dpeformer_criterion,
        build_train_set=build_two_view_train_set,
        sie_and_jpm=False,
        validate=validate_dpeformer_config,
        section="dpeformer",
        section_type=DPEFormerConfig,
    )
)
