"""Released fine-tuned checkpoints (``torch.save(model.state_dict())`` of the published training code, or
torchreid's ``{"state_dict", "epoch", "rank1", "mAP", "ssmd", "config", "optimizer", "scheduler"}``; a
``module.`` prefix and a ``model`` / ``state_dict`` wrapper are accepted) are recognised by their keys
(:data:`PUBLISHED_LAYOUTS`, :func:`published_layout`) and, given a config of the matching method, loaded by
:func:`load_published_checkpoint`; every key is renamed by an explicit rule (:func:`map_published_state_dict`)
or dropped with its reason, and every other difference is reported and refused unless allowed (the rule
machinery, the ViT ``base`` and the TransReID / PASS-reID head rules are :mod:`passreid.models.published`):

=====================  ==============================================================================
layout (method)        published -> passreid
=====================  ==============================================================================
all TransReID-family   ``base.<ViT key>`` -> ``backbone.<key>`` (the [CLS] slot of ``pos_embed`` becomes
                       ``cls_pos``); ``base.sie_embed`` -> ``sie_embed``; ``base.fc.*`` (the ViT's ImageNet
                       classifier) dropped; with ``b1`` (TransReID JPM, TSD): ``b1.0`` / ``b1.1`` ->
                       ``backbone.blocks.<last>`` / ``backbone.norm``, ``base.blocks.<last>`` and
                       ``base.norm`` dropped (``b1`` replaces them in the published forward)
TransReID / PASS-reID  ``bottleneck`` -> ``head.necks.0``; ``bottleneck_k`` (PASS part tokens) ->
(``bnneck``)           ``head.necks.k``; ``classifier`` -> ``head.classifier``; JPM: ``b2.0`` / ``b2.1`` ->
                       ``jpm.block`` / ``jpm.norm``, ``bottleneck_k`` / ``classifier_k`` ->
                       ``jpm.heads.<k-1>.necks.0`` / ``.classifier`` (PASS-reID, TransReID
                       ``processor.py``)
DPM (``dpm``)          ``base.ConvLayer`` -> ``mask_generator.convs``; ``base.attfc`` ->
                       ``mask_generator.fc``; ``bottleneck`` -> ``head.necks.0``; ``classifier.weight``
                       (MArcface) -> ``head.classifier.weight`` (DPM ``model/make_model.py``)
TSD (``tsd``)          ``bottleneck`` / ``classifier`` -> ``global_neck`` / ``global_classifier``;
                       ``memory_post_norm`` -> ``memory_norm``; ``query_embedding.weight`` ->
                       ``query_embedding``; ``part_decoder.{gp_self_attention, cross_attention, norm1,
                       norm2, ffn.layers.0.0, ffn.layers.1}`` -> ``decoder.{self_attention,
                       cross_attention, norm1, norm2, ffn.0, ffn.2}``; ``part_decoder.post_norm`` dropped
                       (unused); ``bottleneck_part`` / ``classifier_part`` -> ``part_neck`` /
                       ``part_classifier``; ``bottleneck_partm`` / ``classifier_partm`` -> ``pooled_*``;
                       ``bottleneck_fg`` / ``classifier_fg`` -> ``fore_*``; ``visb_pred`` ->
                       ``visibility_head`` (TSD ``model/tsd.py``)
DPEFormer              ``bottleneck_local.0-3`` / ``.4-7`` -> ``stripe_necks`` / ``part_necks``;
(``dpeformer``)        ``classifier1`` / ``classifier1_4`` / ``classifier3`` / ``classifier_local.4-7`` ->
                       ``stripe_classifier`` / ``part_concat_classifier`` / ``global_classifier`` /
                       ``part_classifiers``; ``attention_global.k.{pos_embed, Block.norm1, Block.norm2,
                       Block.norm3, Block.attn.q/kv/proj, Block.mlp.fc1/fc2}`` -> ``blending.k.{pos_embed,
                       norm_part, norm_global, norm_mlp, q/kv/proj, mlp.0/mlp.2}``; the modules its test
                       forward never uses (``b2``, ``REM_zx``, ``ffn2/3``, other classifiers and BNs) dropped;
                       ``memory.features`` is saved in a file of its own and not needed for evaluation
                       (DPEFormer ``model/make_model_zx.py``)
BPBReID (torchreid,     ``backbone_appearance_feature_extractor`` -> ``backbone`` (HRNet-W32 / ResNet-50:
``bpbreid``)           same names; HRNet's ``cls_head`` (run only with ``dim_reduce: before_pooling``) and
                       the ResNet's ``classifier`` dropped); ``{global, foreground,
                       parts}_after_pooling_dim_reduce.layers.0`` / ``.layers.1`` -> ``*_reduction.linear``
                       / ``.bn``; ``pixel_classifier``; ``{global, foreground}_identity_classifier`` ->
                       ``*_classifier``; ``concat_parts_identity_classifier`` -> ``concat_classifier``;
                       ``parts_identity_classifier.k`` -> ``parts_classifiers.k``;
                       ``background_after_pooling_dim_reduce`` / ``background_identity_classifier``
                       dropped (no GiLt term, not a test embedding) (bpbreid ``torchreid/models/bpbreid.py``,
                       ``hrnet.py``, ``resnet.py``). Other ``model.bpbreid`` settings (``dim_reduce``
                       other than ``after_pooling``, a shared part classifier, another backbone or K) are
                       refused with the setting named; test-time settings of the stored torchreid config
                       that passreid does not compute are warned about
=====================  ==============================================================================
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from passreid.data.masks import PART_GROUPINGS, num_parts
from passreid.engine import unwrap_model
from passreid.finetune.config import FinetuneConfig
from passreid.finetune.methods import build_model
from passreid.models import CheckpointFormatError, CheckpointMismatchError, LoadReport
from passreid.models.checkpoint import matches_any
from passreid.models.published import (KeyRule, key_rule, rename_published_keys, strip_module_prefix,
                                      transreid_head_rules)

__all__ = [
    "EXPECTED_FINETUNED_FILES",
    "PUBLISHED_LAYOUTS",
    "PublishedLayout",
    "load_published_checkpoint",
    "map_published_state_dict",
    "published_layout",
]

logger = logging.getLogger(__name__)


def _dpm_rules(depth: int, jpm: bool) -> list[KeyRule]:
    return [key_rule(r"base\.ConvLayer\.", "mask_generator.convs."), key_rule(r"base\.attfc\.", "mask_generator.fc."),
            key_rule(r"bottleneck\.", "head.necks.0."), key_rule(r"classifier\.", "head.classifier.")]


def _tsd_rules(depth: int, jpm: bool) -> list[KeyRule]:
    return [
        key_rule(r"bottleneck\.", "global_neck."), key_rule(r"classifier\.", "global_classifier."),
        key_rule(r"memory_post_norm\.", "memory_norm."), key_rule(r"query_embedding\.weight$", "query_embedding"),
        key_rule(r"part_decoder\.gp_self_attention\.", "decoder.self_attention."),
        key_rule(r"part_decoder\.cross_attention\.", "decoder.cross_attention."),
        key_rule(r"part_decoder\.norm([12])\.", r"decoder.norm\1."),
        key_rule(r"part_decoder\.ffn\.layers\.0\.0\.", "decoder.ffn.0."),
        key_rule(r"part_decoder\.ffn\.layers\.1\.", "decoder.ffn.2."),
        key_rule(r"part_decoder\.post_norm\.", unused="built but unused by the released forward"),
        key_rule(r"bottleneck_part\.", "part_neck."), key_rule(r"classifier_part\.", "part_classifier."),
        key_rule(r"bottleneck_partm\.", "pooled_neck."), key_rule(r"classifier_partm\.", "pooled_classifier."),
        key_rule(r"bottleneck_fg\.", "fore_neck."), key_rule(r"classifier_fg\.", "fore_classifier."),
        key_rule(r"visb_pred\.", "visibility_head."), key_rule(r"pixel_classifier\.", "pixel_classifier."),
    ]


def _dpeformer_rules(depth: int, jpm: bool) -> list[KeyRule]:
    unused = "unused by the released test forward"
    return [
        key_rule(r"b2\.", unused="copies of the last block + LN, " + unused),
        key_rule(r"bottleneck_local\.([0-3])\.", r"stripe_necks.\1."),
        key_rule(r"bottleneck_local\.([4-7])\.", lambda m: f"part_necks.{int(m.group(1)) - 4}."),
        key_rule(r"classifier_local\.([4-7])\.", lambda m: f"part_classifiers.{int(m.group(1)) - 4}."),
        key_rule(r"classifier1\.", "stripe_classifier."), key_rule(r"classifier1_4\.", "part_concat_classifier."),
        key_rule(r"classifier3\.", "global_classifier."),
        key_rule(r"attention_global\.(\d+)\.pos_embed$", r"blending.\1.pos_embed"),
        key_rule(r"attention_global\.(\d+)\.Block\.norm1\.", r"blending.\1.norm_part."),
        key_rule(r"attention_global\.(\d+)\.Block\.norm2\.", r"blending.\1.norm_global."),
        key_rule(r"attention_global\.(\d+)\.Block\.norm3\.", r"blending.\1.norm_mlp."),
        key_rule(r"attention_global\.(\d+)\.Block\.attn\.(q|kv|proj)\.", r"blending.\1.\2."),
        key_rule(r"attention_global\.(\d+)\.Block\.mlp\.fc1\.", r"blending.\1.mlp.0."),
        key_rule(r"attention_global\.(\d+)\.Block\.mlp\.fc2\.", r"blending.\1.mlp.2."),
        key_rule(r"attention_global\.\d+\.(norm1|norm2|attn|param|Block\.attn\.param)", unused=unused),
        key_rule(r"(bottleneck_local\.[89]|classifier_local\.[0-389]|bottleneck_local_stage2|bottleneck_global|"
              r"classifier1_[23]|classifier2|REM_zx|ffn[23])\b", unused=unused),
    ]


_TORCHREID_BACKBONE = "backbone_appearance_feature_extractor."


def _bpbreid_rules(depth: int, jpm: bool) -> list[KeyRule]:
    backbone = re.escape(_TORCHREID_BACKBONE)
    background = "the background embedding: no GiLt loss term and not a test embedding"
    return [
        key_rule(backbone + r"cls_head\.", unused="HRNet's 1x1 reduction of the feature map, run only with "
                                              "model.bpbreid.dim_reduce=before_pooling"),
        key_rule(backbone + r"classifier\.",
                 unused="the ResNet's own identity classifier, unused by BPBReID's forward"),
        key_rule(backbone, "backbone."),
        key_rule(r"(global|foreground|parts)_after_pooling_dim_reduce\.layers\.0\.", r"\1_reduction.linear."),
        key_rule(r"(global|foreground|parts)_after_pooling_dim_reduce\.layers\.1\.", r"\1_reduction.bn."),
        key_rule(r"background_(after_pooling_dim_reduce|identity_classifier)\.", unused=background),
        key_rule(r"pixel_classifier\.", "pixel_classifier."),
        key_rule(r"(global|foreground)_identity_classifier\.", r"\1_classifier."),
        key_rule(r"concat_parts_identity_classifier\.", "concat_classifier."),
        key_rule(r"parts_identity_classifier\.(\d+)\.", r"parts_classifiers.\1."),
    ]


@dataclass(frozen=True)
class PublishedLayout:
    """A released fine-tuned state-dict layout and how it maps onto a passreid method's model.

    A state dict is of this layout when a key starts with ``marker`` and ``classifier`` is present.
    ``method`` is the passreid method whose model it loads into; ``classifier`` the key whose rows are the
    training identities; ``vit_base`` whether the backbone is TransReID's ViT ``base`` (its rules and key
    conversion apply); ``training_only`` model keys that the released file does not hold and that evaluation
    does not use.
    """

    name: str
    signature: str
    marker: str
    method: str
    recipe: str
    rules: Callable[[int, bool], list[KeyRule]]
    classifier: str = "classifier.weight"
    vit_base: bool = True
    training_only: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"a released {self.name} checkpoint ({self.signature})"


PUBLISHED_LAYOUTS = (
    PublishedLayout("BPBReID (torchreid)", "backbone_appearance_feature_extractor.*, *_identity_classifier.*",
                    _TORCHREID_BACKBONE, "bpbreid",
                    "configs/finetune/market1501/bpbreid_hrnet32_384.yaml (model.arch=resnet50 for a ResNet-50 file)",
                    _bpbreid_rules, classifier="global_identity_classifier.classifier.weight", vit_base=False),
    PublishedLayout("DPM", "base.*, base.ConvLayer.*, base.attfc.*, bottleneck.*, classifier.weight",
                    "base.ConvLayer.", "dpm", "configs/finetune/occluded_duke/dpm_vit_b_256.yaml", _dpm_rules),
    PublishedLayout("TSD", "base.*, b1.*, part_decoder.*, query_embedding.weight, bottleneck_part.*, visb_pred.*",
                    "part_decoder.", "tsd", "configs/finetune/occluded_duke/tsd_vit_b_256.yaml", _tsd_rules),
    PublishedLayout("DPEFormer", "base.*, attention_global.*, bottleneck_local.*, classifier1.*, classifier3.*",
                    "attention_global.", "dpeformer", "configs/finetune/occluded_duke/dpeformer_vit_b_256.yaml",
                    _dpeformer_rules, classifier="classifier3.weight",
                    # the released training saves its class-centroid memory in a file of its own
                    training_only=("memory.features",)),
    PublishedLayout("TransReID / PASS-reID", "base.*, bottleneck*, classifier*, b1/b2 with JPM", "base.",
                    "bnneck",
                    "configs/finetune/market1501/transreid_vit_b_256.yaml (TransReID) or "
                    "configs/finetune/market1501/pass_vit_b_256.yaml (PASS)", transreid_head_rules),
)
EXPECTED_FINETUNED_FILES = ("a passreid model_final.pth / checkpoint.pth, or a released fine-tuned checkpoint of "
                       "TransReID / PASS-reID, DPM, TSD, DPEFormer or BPBReID (key layouts: finetune/README.md)")


def published_layout(obj: Mapping[str, Any]) -> PublishedLayout | None:
    """The released layout of a fine-tuned checkpoint or state dict (``module.`` prefixes and a ``model`` /
    ``state_dict`` wrapper allowed), else ``None``."""
    keys = [key[len("module."):] if key.startswith("module.") else key for key in map(str, _inner_state(obj))]
    for layout in PUBLISHED_LAYOUTS:
        if any(key.startswith(layout.marker) for key in keys) and layout.classifier in keys:
            return layout
    return None


def _inner_state(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict of a released checkpoint (torchreid and others wrap it as ``state_dict`` / ``model``)."""
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
    return obj


def _unwrap_published(obj: Mapping[str, Any], label: str) -> dict[str, Tensor]:
    obj = _inner_state(obj)
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise CheckpointFormatError(f"{label}: entry {key!r} is a {type(value).__name__}, expected a tensor "
                                        f"(a state dict of a fine-tuned model); expected {EXPECTED_FINETUNED_FILES}")
    return strip_module_prefix(obj)


def map_published_state_dict(
    state: Mapping[str, Tensor], depth: int, jpm: bool, layout: PublishedLayout | None = None
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Rename a released fine-tuned state dict of ``layout`` (default TransReID / PASS-reID) to passreid names
    (module docstring): ``(mapped, dropped, unknown)`` as :func:`passreid.models.published.rename_published_keys`."""
    layout = layout or PUBLISHED_LAYOUTS[-1]
    return rename_published_keys(state, layout.rules(depth, jpm), depth, vit_base=layout.vit_base)


def load_published_checkpoint(
    obj: Mapping[str, Any],
    cfg: FinetuneConfig,
    *,
    label: str = "<published checkpoint>",
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
) -> tuple[nn.Module, LoadReport]:
    """Build the ``cfg`` model (classes and cameras from the checkpoint) and load a released checkpoint
    of any :data:`PUBLISHED_LAYOUTS` layout into it.

    Raises :class:`CheckpointFormatError` for a file of no known layout (saying what it holds and what was
    expected), :class:`CheckpointMismatchError` naming the setting when the file was trained with a method,
    backbone, JPM / SIE or (BPBReID) reduction, part classifier or number of parts the config does not build,
    and with the full report unless every missing / unexpected / shape-mismatched key matches ``allow_missing``
    / ``allow_unexpected``. Every dropped key is reported by name (``report.dropped``, logged).
    """
    state = _unwrap_published(obj, label)
    layout = published_layout(state)
    if layout is None:
        shown = ", ".join(sorted(state)[:6]) or "nothing"
        raise CheckpointFormatError(f"{label} is not a fine-tuned model passreid recognises (it holds {shown}"
                                    f"{', ...' if len(state) > 6 else ''}); expected {EXPECTED_FINETUNED_FILES}")
    _check_config_fits(layout, state, cfg, label)
    if layout.method == "bpbreid":
        _warn_bpbreid_test_settings(obj, cfg, label)
    num_classes = int(state[layout.classifier].shape[0])
    num_cameras = int(state["base.sie_embed"].shape[0]) if "base.sie_embed" in state else 0
    model = build_model(cfg, num_classes, num_cameras, load_weights=False)
    depth = getattr(unwrap_model(model).backbone, "depth", 0)  # a ViT's; CNN backbones take no depth-based rule
    mapped, dropped, unknown = map_published_state_dict(state, depth, cfg.model.jpm, layout)
    expected = model.state_dict()
    report = LoadReport(source=label, dropped=dropped)
    report.match(mapped, expected)
    report.unexpected.extend(f"{k} (no mapping rule)" for k in unknown)
    refused = [k for k in report.missing if k not in layout.training_only and not matches_any(k, allow_missing)]
    refused += [k for k, _, _ in report.shape_mismatched if not matches_any(k, allow_missing)]
    refused += [k for k in report.unexpected if not matches_any(k.split(" ")[0], allow_unexpected)]
    if refused:
        raise CheckpointMismatchError(f"{label} ({layout.describe()}) does not match the model of the config; not "
                                      f"allowed: {', '.join(refused)}\n{report.summary()}")
    model.load_state_dict({k: mapped[k] for k in report.loaded}, strict=False)
    logger.info("%s mapped to passreid names:\n%s", layout.describe(), report.summary())
    training_only = [k for k in layout.training_only if k in report.missing]
    if training_only:
        logger.info("%s: %s not in the released file (used in training only, not by evaluation); left as built",
                    label, ", ".join(training_only))
    return model, report


def _check_config_fits(layout: PublishedLayout, state: Mapping[str, Tensor], cfg: FinetuneConfig, label: str) -> None:
    """The config must build the method, JPM and SIE the released checkpoint was trained with."""
    if cfg.method != layout.method:
        raise CheckpointMismatchError(
            f"{label} is {layout.describe()}, which loads into method: {layout.method}, but the config's method is "
            f"{cfg.method!r}; use a {layout.method} config such as {layout.recipe}"
        )
    has_jpm, has_sie = layout.method == "bnneck" and any(k.startswith("b2.") for k in state), "base.sie_embed" in state
    if has_jpm != cfg.model.jpm or has_sie != cfg.model.sie_camera:
        raise CheckpointMismatchError(
            f"{label} was trained with JPM={has_jpm}, SIE={has_sie} but the config says model.jpm="
            f"{cfg.model.jpm}, model.sie_camera={cfg.model.sie_camera}; use a config that matches the checkpoint"
        )
    if layout.method == "bpbreid":
        _check_bpbreid_fits(state, cfg, label)
    if layout.method == "dpeformer" and cfg.dpeformer.global_token != "first_patch":
        logger.warning("%s: the released DPEFormer code trains with the first patch token as the global token; the "
                       "config says dpeformer.global_token=%s, so the loaded model's global token is not the one "
                       "these weights were trained with (set dpeformer.global_token=first_patch)", label,
                       cfg.dpeformer.global_token)


# --------------------------------------------------------------------------- BPBReID (torchreid) fit

_PASSREID_CNN = "passreid builds HRNet-W32 (model.arch=hrnet_w32) and ResNet-50 (model.arch=resnet50)"


def _torchreid_backbone(state: Mapping[str, Tensor]) -> tuple[str, str | None]:
    """``(what the released backbone is, the model.arch that builds it or None)``, from its key names."""
    keys = [key[len(_TORCHREID_BACKBONE):] for key in state if key.startswith(_TORCHREID_BACKBONE)]
    transition = state.get(f"{_TORCHREID_BACKBONE}transition1.0.0.weight")
    if transition is not None:
        width = int(transition.shape[0])
        return f"HRNet-W{width}", "hrnet_w32" if width == 32 else None
    if any(".IN." in key for key in keys):
        return "ResNet-IBN (IBN-Net; timm has none)", None
    if any(key.startswith("layer4.") for key in keys):
        blocks = len({key.split(".")[1] for key in keys if key.startswith("layer3.")})
        return ("ResNet-50", "resnet50") if blocks == 6 else (f"ResNet with {blocks} blocks in layer3", None)
    return "backbone that is neither HRNet nor ResNet", None


def _check_bpbreid_fits(state: Mapping[str, Tensor], cfg: FinetuneConfig, label: str) -> None:
    """A released BPBReID file loads into passreid's bpbreid only with the published model structure
    (``model.bpbreid.dim_reduce: after_pooling``, one identity classifier per part) on a backbone passreid
    builds; the config must name that backbone, the file's reduction width and its number of parts."""
    backbone, arch = _torchreid_backbone(state)
    if arch is None:
        raise CheckpointMismatchError(f"{label} is a released BPBReID checkpoint with a {backbone} backbone; "
                                      f"{_PASSREID_CNN}, so it cannot be loaded")
    if cfg.model.arch != arch:
        raise CheckpointMismatchError(f"{label} was trained on a {backbone} backbone but the config's model.arch is "
                                      f"{cfg.model.arch!r}; set model.arch={arch} (the bpbreid_hrnet32_384.yaml recipes use "
                                      "hrnet_w32)")
    reduction = state.get("global_after_pooling_dim_reduce.layers.0.weight")
    if reduction is None or any(key.startswith("before_pooling_dim_reduce.") for key in state):
        held = ("a before-pooling reduction (before_pooling_dim_reduce.*)" if reduction is not None
                else "no after-pooling reduction (*_after_pooling_dim_reduce.*)")
        raise CheckpointMismatchError(
            f"{label} holds {held}: it was trained with a model.bpbreid.dim_reduce other than after_pooling (the "
            "published default); passreid's bpbreid only reduces each pooled embedding after pooling (Linear + "
            "BN1d + ReLU), so it cannot be loaded")
    if reduction.shape[0] != cfg.bpbreid.dim_reduce:
        raise CheckpointMismatchError(f"{label} reduces embeddings to {reduction.shape[0]} channels but the config "
                                      f"says bpbreid.dim_reduce={cfg.bpbreid.dim_reduce}; set "
                                      f"bpbreid.dim_reduce={reduction.shape[0]}")
    if any(key.startswith("parts_identity_classifier.bn.") for key in state):
        raise CheckpointMismatchError(
            f"{label} was trained with model.bpbreid.shared_parts_id_classifier=True (parts_identity_classifier.bn.*: "
            "one identity classifier for all parts); passreid's bpbreid has one per part. Evaluation does not use "
            "them: --allow-missing 'parts_classifiers.*' --allow-unexpected 'parts_identity_classifier.*' loads "
            "the rest")
    pixel = state.get("pixel_classifier.classifier.weight")
    parts = num_parts(cfg.data.mask_preprocess)
    if pixel is not None and pixel.shape[0] - 1 != parts:
        groupings = [name for name in PART_GROUPINGS if num_parts(name) == pixel.shape[0] - 1]
        raise CheckpointMismatchError(
            f"{label} was trained with {pixel.shape[0] - 1} body parts (pixel_classifier: background + parts) but "
            f"the config's data.mask_preprocess={cfg.data.mask_preprocess} has {parts}; set data.mask_preprocess to "
            f"a grouping of {pixel.shape[0] - 1} parts ({', '.join(groupings) or 'passreid has none'}; the released "
            "configs name theirs in model.bpbreid.masks.preprocess)")


# model.bpbreid settings of a torchreid config that change the test features, at the value passreid's bpbreid
# computes (bpbreid torchreid/scripts/default_config.py defaults); testing_binary_visibility_score follows the config.
_BPBREID_TEST_SETTINGS = {"learnable_attention_enabled": True, "pooling": "gwap",
                          "test_use_target_segmentation": "none", "test_embeddings": ["bn_foreg", "parts"]}


def _warn_bpbreid_test_settings(obj: Mapping[str, Any], cfg: FinetuneConfig, label: str) -> None:
    """Warn when the torchreid config stored in a released BPBReID file tests differently from passreid's model."""
    config = obj.get("config")
    model = config.get("model") if isinstance(config, Mapping) else None
    stored = model.get("bpbreid") if isinstance(model, Mapping) else None
    if not isinstance(stored, Mapping):
        return
    expected = {**_BPBREID_TEST_SETTINGS, "testing_binary_visibility_score": cfg.bpbreid.visibility == "binary"}
    differing = [key for key, value in expected.items()
                 if key in stored and (list(stored[key]) if isinstance(value, list) else stored[key]) != value]
    if differing:
        hint = ("; bpbreid.visibility=binary|continuous sets passreid's visibility score"
                if "testing_binary_visibility_score" in differing else "")
        logger.warning("%s: the released run's config has %s, so passreid's features differ from the published "
                       "evaluation%s", label, "; ".join(f"model.bpbreid.{key}={stored[key]!r} (passreid: "
                                                        f"{expected[key]!r})" for key in differing), hint)
