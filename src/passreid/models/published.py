"""Renaming the keys of released TransReID-family state dicts to passreid's names: the rule machinery, the ViT
``base`` that every TransReID-family model shares, and the TransReID / PASS-reID BNNeck head of
:class:`passreid.models.reid.ReIDModel`.

The ViT ``base.<key>`` becomes ``backbone.<key>`` (the [CLS] slot of ``pos_embed`` becomes ``cls_pos``),
``base.sie_embed`` becomes ``sie_embed``, the ViT's ImageNet classifier ``base.fc`` is dropped; with ``b1``
(TransReID JPM, TSD) ``b1.0`` / ``b1.1`` become the last block / final LN. The head: ``bottleneck`` ->
``head.necks.0``, ``bottleneck_k`` (PASS part tokens) -> ``head.necks.k``, ``classifier`` ->
``head.classifier``; JPM's ``b2`` and per-branch necks / classifiers -> ``jpm.*`` (PASS-reID, TransReID
``model/make_model.py``). The rules of the occluded methods' heads are in
:mod:`passreid.finetune.published_checkpoints`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from passreid.models.checkpoint import extract_backbone_state_dict

__all__ = ["KeyRule", "key_rule", "rename_published_keys", "strip_module_prefix", "transreid_head_rules",
           "transreid_vit_rules"]

_Target = str | Callable[[re.Match[str]], str | None] | None


@dataclass(frozen=True)
class KeyRule:
    """Rename keys that start with ``pattern`` (a regex) to ``target`` + the rest of the key, or drop them
    (``target`` None) for the stated ``reason``. ``target`` may use the pattern's groups (a callable)."""

    pattern: re.Pattern[str]
    target: _Target
    reason: str = ""

    def apply(self, key: str) -> tuple[bool, str | None]:
        """``(matched, new key or None to drop)``; a callable target returning ``None`` does not match."""
        match = self.pattern.match(key)
        if match is None:
            return False, None
        if self.target is None:
            return True, None
        head = self.target(match) if callable(self.target) else match.expand(self.target)
        return (False, None) if head is None else (True, head + key[match.end():])


def key_rule(pattern: str, target: _Target = None, unused: str = "") -> KeyRule:
    """A :class:`KeyRule` from a regex string; ``target`` None drops the keys for the reason ``unused``."""
    return KeyRule(re.compile(pattern), target, unused)


def transreid_vit_rules(depth: int, last_block_copied: bool) -> list[KeyRule]:
    """The TransReID ViT ``base`` of every TransReID-family model (TransReID, PASS-reID, DPM, TSD, DPEFormer).

    ``b1 = copy(last block, final LN)`` (TransReID JPM, TSD) replaces the backbone's own last block and LN
    in the forward; passreid's model uses the backbone's, so the copies are loaded there."""
    rules = [key_rule(r"base\.sie_embed$", "sie_embed"),
             key_rule(r"base\.fc\.", unused="the ViT's ImageNet classifier, unused by the re-ID forward")]
    if last_block_copied:
        rules += [key_rule(rf"base\.blocks\.{depth - 1}\.", unused="unused by the published forward: b1 replaces it"),
                  key_rule(r"base\.norm\.", unused="unused by the published forward: b1 replaces it"),
                  key_rule(r"b1\.0\.", f"backbone.blocks.{depth - 1}."), key_rule(r"b1\.1\.", "backbone.norm.")]
    return rules + [key_rule(r"base\.", "backbone.")]


def transreid_head_rules(depth: int, jpm: bool) -> list[KeyRule]:
    """The TransReID / PASS-reID BNNeck head (and JPM branches) onto :class:`~passreid.models.reid.ReIDModel`."""
    def head(match: re.Match[str]) -> str | None:
        kind, index = match.group(1), match.group(2)
        module = "necks.0" if kind == "bottleneck" else "classifier"
        if index is None:
            return f"head.{module}."
        if jpm:
            return f"jpm.heads.{int(index) - 1}.{module}."
        return f"head.necks.{int(index)}." if kind == "bottleneck" else None  # classifier_k without JPM: no rule

    return [key_rule(r"b2\.0\.", "jpm.block."), key_rule(r"b2\.1\.", "jpm.norm."),
            key_rule(r"(bottleneck|classifier)(?:_(\d+))?\.", head)]


def strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` without the ``module.`` prefix of a (Distributed)DataParallel save."""
    return {(key[len("module."):] if key.startswith("module.") else key): value for key, value in state.items()}


def rename_published_keys(state: Mapping[str, Tensor], rules: Sequence[KeyRule], depth: int, vit_base: bool = True
                          ) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Rename every key of a released state dict by the first of ``rules`` that matches it (with the ViT
    ``base`` rules after them when ``vit_base``; ``depth`` is the ViT's number of blocks).

    Returns ``(mapped, dropped, unknown)``: ``dropped`` lists keys deliberately discarded (with the
    reason), ``unknown`` the keys no rule covers (for the caller to report).
    """
    rules = list(rules)
    if vit_base:
        rules += transreid_vit_rules(depth, any(k.startswith("b1.") for k in state))
    mapped: dict[str, Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, value in state.items():
        for rule in rules:
            matched, target = rule.apply(key)
            if matched:
                break
        else:
            unknown.append(key)
            continue
        if target is None:
            dropped.append(f"{key} ({rule.reason})")
        else:
            mapped[target] = value
    backbone = {k[len("backbone."):]: v for k, v in mapped.items() if k.startswith("backbone.")}
    if backbone and vit_base:
        backbone, base_dropped = extract_backbone_state_dict(backbone)
        mapped = {k: v for k, v in mapped.items() if not k.startswith("backbone.")}
        mapped.update({f"backbone.{key}": value for key, value in backbone.items()})
        dropped += [f"base.{name}" for name in base_dropped]
    return mapped, dropped, unknown
