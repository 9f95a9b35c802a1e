"""Fine-tuned model files: passreid's ``model_final.pth`` and published TransReID / PASS checkpoints.

``model_final.pth`` (written by the trainer with :func:`build_final_checkpoint`)::

    {"model": state_dict,                      # ReIDModel (or another method's model), CPU tensors
     "meta": {"format": "passreid-finetune", "format_version": 1, "method",
              "arch", "img_size", "patch_size", "stride_size", "num_part_tokens",
              "num_classes", "num_cameras",     # training identities / cameras (SIE table size if SIE)
              "head", "feat_fusion", "multi_neck", "neck_feat", "sie", "sie_coe",
              "jpm", "jpm_num_branches", "jpm_shift", "jpm_shuffle_groups", "jpm_rearrange",
              "feature_dim", "config"}}         # config: the full resolved FinetuneConfig as a dict

:func:`load_finetuned_model` rebuilds the model from that file alone. It also reads a training
``checkpoint.pth`` of a run (config inside, class/camera counts from the tensor shapes) and, given
a config, the published fine-tuned checkpoints (finetune-occluded.md §3), whose names are mapped
explicitly by :func:`map_published_state_dict`:

=======================================  ===============================================
published (PASS / TransReID)             passreid
=======================================  ===============================================
``base.<backbone key>``                  ``backbone.<key>`` (TransReID's [CLS] position slot
                                         of ``pos_embed`` becomes ``cls_pos``)
``base.sie_embed``                       ``sie_embed``
``bottleneck``                           ``head.necks.0`` ([CLS] BN)
``bottleneck_k`` (PASS, k = 1..3)        ``head.necks.k`` (part-token BN)
``classifier``                           ``head.classifier``
``b1.0`` / ``b1.1`` (JPM)                ``backbone.blocks.<last>`` / ``backbone.norm``
``b2.0`` / ``b2.1`` (JPM)                ``jpm.block`` / ``jpm.norm``
``bottleneck_k``, ``classifier_k`` (JPM) ``jpm.heads.<k-1>.necks.0``, ``jpm.heads.<k-1>.classifier``
=======================================  ===============================================

A JPM checkpoint's ``base.blocks.<last>`` and ``base.norm`` are unused by its forward (``b1`` replaces
them); they are reported as dropped. Every other difference is reported and refused unless allowed.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from passreid.config import config_from_dict, config_to_dict
from passreid.engine import unwrap_model
from passreid.finetune.config import FinetuneConfig, validate_config
from passreid.finetune.methods import build_model
from passreid.models import (CheckpointFormatError, CheckpointMismatchError, LoadReport,
                             extract_backbone_state_dict, read_checkpoint)
from passreid.models.checkpoint import matches_any

__all__ = [
    "FINAL_FORMAT",
    "FINAL_FORMAT_VERSION",
    "build_final_checkpoint",
    "load_finetuned_model",
    "load_published_checkpoint",
    "map_published_state_dict",
    "stored_config",
]

logger = logging.getLogger(__name__)

FINAL_FORMAT = "passreid-finetune"
FINAL_FORMAT_VERSION = 1
_PUBLISHED_HEAD = re.compile(r"^(bottleneck|classifier)(?:_(\d+))?\.(.+)$")
_JPM_COPIES = {"b1.0.": None, "b1.1.": "backbone.norm.", "b2.0.": "jpm.block.", "b2.1.": "jpm.norm."}


def build_final_checkpoint(model: nn.Module, cfg: FinetuneConfig, num_classes: int, num_cameras: int) -> dict:
    """The ``model_final.pth`` dict (module docstring) for ``model`` trained with ``cfg``."""
    model = unwrap_model(model)
    m = cfg.model
    meta = {
        "format": FINAL_FORMAT,
        "format_version": FINAL_FORMAT_VERSION,
        "method": cfg.method,
        "arch": m.arch,
        "img_size": list(m.img_size),
        "patch_size": m.patch_size,
        "stride_size": m.stride_size,
        "num_part_tokens": m.num_part_tokens,
        "num_classes": int(num_classes),
        "num_cameras": int(num_cameras),
        "head": m.head,
        "feat_fusion": m.feat_fusion,
        "multi_neck": m.multi_neck,
        "neck_feat": m.neck_feat,
        "sie": m.sie_camera,
        "sie_coe": m.sie_coe,
        "jpm": m.jpm,
        "jpm_num_branches": m.jpm_num_branches,
        "jpm_shift": m.jpm_shift,
        "jpm_shuffle_groups": m.jpm_shuffle_groups,
        "jpm_rearrange": m.jpm_rearrange,
        "feature_dim": int(getattr(model, "feature_dim", 0)),
        "config": config_to_dict(cfg),
    }
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    return {"model": state, "meta": meta}


def _load_strict(model: nn.Module, state: Mapping[str, Tensor], label: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists every differing key and shape."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            f"{label} does not match the model rebuilt from its config: missing {missing}, "
            f"unexpected {unexpected}, shape mismatches {shapes}"
        )
    model.load_state_dict(state, strict=True)


def _config_of(raw: Any, label: str) -> FinetuneConfig:
    if not isinstance(raw, Mapping):
        raise CheckpointFormatError(f"{label}: no fine-tuning config stored in the file")
    return validate_config(config_from_dict(FinetuneConfig, raw, source=f"{label} (stored config)"))


def _counts_from_state(state: Mapping[str, Tensor], label: str) -> tuple[int, int]:
    """(num_classes, num_cameras) of a passreid ReIDModel state dict, from the tensor shapes."""
    if "head.classifier.weight" not in state:
        raise CheckpointFormatError(f"{label}: no 'head.classifier.weight'; cannot tell the number of classes")
    num_cameras = state["sie_embed"].shape[0] if "sie_embed" in state else 0
    return int(state["head.classifier.weight"].shape[0]), int(num_cameras)


def load_finetuned_model(
    source: str | os.PathLike | Mapping[str, Any],
    cfg: FinetuneConfig | None = None,
    *,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
) -> tuple[nn.Module, FinetuneConfig, LoadReport | None]:
    """Rebuild a fine-tuned model from a file; returns ``(model in eval mode, config it was built with, report)``.

    * ``model_final.pth``: everything comes from the file (``cfg`` is not needed, and ignored for the
      model; a differing ``cfg.model`` is logged);
    * a run's ``checkpoint.pth``: the model config is the one stored in it;
    * a published TransReID / PASS checkpoint: ``cfg`` describes the architecture (head, JPM, SIE,
      size, stride); keys are mapped and reported (``report``), see :func:`load_published_checkpoint`.
    """
    label = str(source) if isinstance(source, (str, os.PathLike)) else "<in-memory checkpoint>"
    obj = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{label}: expected a checkpoint dict, got {type(obj).__name__}")
    meta = obj.get("meta")
    if isinstance(meta, Mapping) and meta.get("format") == FINAL_FORMAT:
        if meta.get("format_version") != FINAL_FORMAT_VERSION:
            raise CheckpointFormatError(f"{label}: model_final format version {meta.get('format_version')} "
                                        f"is not supported (expected {FINAL_FORMAT_VERSION})")
        stored = _config_of(meta.get("config"), label)
        model = build_model(stored, meta["num_classes"], meta["num_cameras"], load_weights=False)
        _load_strict(model, obj["model"], label)
        _log_model_differences(stored, cfg, label)
        return model.eval(), stored, None
    if "config" in obj and "iteration" in obj and isinstance(obj.get("model"), Mapping):
        stored = _config_of(obj["config"], label)
        num_classes, num_cameras = _counts_from_state(obj["model"], label)
        model = build_model(stored, num_classes, num_cameras, load_weights=False)
        _load_strict(model, obj["model"], label)
        _log_model_differences(stored, cfg, label)
        return model.eval(), stored, None
    if cfg is None:
        raise CheckpointFormatError(
            f"{label} is not a passreid fine-tuned model (no 'meta'/'config'); pass the config that "
            "describes its architecture (--config-file) to load it as a published TransReID/PASS checkpoint"
        )
    model, report = load_published_checkpoint(obj, cfg, label=label, allow_missing=allow_missing,
                                              allow_unexpected=allow_unexpected)
    return model.eval(), cfg, report


def stored_config(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The config dict stored in a passreid ``model_final.pth`` or training ``checkpoint.pth``."""
    label = str(source) if isinstance(source, (str, os.PathLike)) else "<in-memory checkpoint>"
    obj = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if isinstance(meta, Mapping) and meta.get("format") == FINAL_FORMAT and isinstance(meta.get("config"), Mapping):
        return dict(meta["config"])
    if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping) and "iteration" in obj:
        return dict(obj["config"])
    raise CheckpointFormatError(f"{label} stores no passreid fine-tuning config (a published checkpoint?); "
                                "pass --config-file describing its architecture and test set")


def _log_model_differences(stored: FinetuneConfig, given: FinetuneConfig | None, label: str) -> None:
    if given is None:
        return
    stored_model, given_model = config_to_dict(stored.model), config_to_dict(given.model)
    differing = [k for k in stored_model if k != "pretrained" and stored_model[k] != given_model.get(k)]
    if differing or stored.method != given.method:
        logger.warning("%s was built with a different model config than the one given; using the file's "
                       "(method %s, differing keys: %s)", label, stored.method,
                       ", ".join(f"model.{k}={stored_model[k]!r}" for k in differing) or "none")


# --------------------------------------------------------------------------- published checkpoints


def _unwrap_published(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
    state = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise CheckpointFormatError(f"published checkpoint entry {key!r} is a {type(value).__name__}, "
                                        "expected a tensor (a state dict of the fine-tuned model)")
        state[key[len("module."):] if key.startswith("module.") else key] = value
    return state


def map_published_state_dict(
    state: Mapping[str, Tensor], depth: int, jpm: bool
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Rename a published fine-tuned state dict (``base.*``, ``bottleneck*``, ``classifier*``, ``b1/b2``)
    to passreid names (table in the module docstring).

    Returns ``(mapped, dropped, unknown)``: ``dropped`` lists keys deliberately discarded (with the
    reason), ``unknown`` the keys no rule covers (for the caller to report).
    """
    mapped: dict[str, Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    base: dict[str, Tensor] = {}
    unused_by_jpm = (f"base.blocks.{depth - 1}.", "base.norm.")
    for key, value in state.items():
        if key == "base.sie_embed":
            mapped["sie_embed"] = value
        elif key.startswith("base."):
            if jpm and key.startswith(unused_by_jpm):
                dropped.append(f"{key} (unused by the published JPM forward: b1 replaces it)")
            else:
                base[key[len("base."):]] = value
        elif key[:5] in _JPM_COPIES:
            target = _JPM_COPIES[key[:5]] or f"backbone.blocks.{depth - 1}."
            mapped[target + key[5:]] = value
        elif (match := _PUBLISHED_HEAD.match(key)) is not None:
            kind, index, rest = match.group(1), match.group(2), match.group(3)
            module = "necks.0" if kind == "bottleneck" else "classifier"
            if index is None:
                mapped[f"head.{module}.{rest}"] = value
            elif jpm:
                mapped[f"jpm.heads.{int(index) - 1}.{module}.{rest}"] = value
            elif kind == "bottleneck":
                mapped[f"head.necks.{int(index)}.{rest}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if base:
        backbone, base_dropped = extract_backbone_state_dict(base)
        mapped.update({f"backbone.{key}": value for key, value in backbone.items()})
        dropped += [f"base.{name}" for name in base_dropped]
    return mapped, dropped, unknown


def load_published_checkpoint(
    obj: Mapping[str, Any],
    cfg: FinetuneConfig,
    *,
    label: str = "<published checkpoint>",
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
) -> tuple[nn.Module, LoadReport]:
    """Build the ``cfg`` model (classes and cameras from the checkpoint) and load a published checkpoint.

    Raises :class:`CheckpointMismatchError` with the full report unless every missing / unexpected /
    shape-mismatched key matches ``allow_missing`` / ``allow_unexpected``.
    """
    state = _unwrap_published(obj)
    if "classifier.weight" not in state:
        raise CheckpointFormatError(f"{label}: no 'classifier.weight'; not a published TransReID/PASS model")
    has_jpm, has_sie = any(k.startswith("b2.") for k in state), "base.sie_embed" in state
    if has_jpm != cfg.model.jpm or has_sie != cfg.model.sie_camera:
        raise CheckpointMismatchError(
            f"{label} was trained with JPM={has_jpm}, SIE={has_sie} but the config says model.jpm="
            f"{cfg.model.jpm}, model.sie_camera={cfg.model.sie_camera}; use a config that matches the checkpoint"
        )
    num_classes = int(state["classifier.weight"].shape[0])
    num_cameras = int(state["base.sie_embed"].shape[0]) if has_sie else 0
    model = build_model(cfg, num_classes, num_cameras, load_weights=False)
    depth = unwrap_model(model).backbone.depth
    mapped, dropped, unknown = map_published_state_dict(state, depth, cfg.model.jpm)
    expected = model.state_dict()
    report = LoadReport(source=label, dropped=dropped, num_model_tensors=len(expected))
    for key, target in expected.items():
        if key not in mapped:
            report.missing.append(key)
        elif mapped[key].shape != target.shape:
            report.shape_mismatched.append((key, tuple(mapped[key].shape), tuple(target.shape)))
        else:
            report.loaded.append(key)
    report.unexpected = [k for k in mapped if k not in expected] + [f"{k} (no mapping rule)" for k in unknown]
    refused = [k for k in report.missing if not matches_any(k, allow_missing)]
    refused += [k for k, _, _ in report.shape_mismatched if not matches_any(k, allow_missing)]
    refused += [k for k in report.unexpected if not matches_any(k.split(" ")[0], allow_unexpected)]
    if refused:
        raise CheckpointMismatchError(f"{label} does not match the model of the config; not allowed: "
                                      f"{', '.join(refused)}\n{report.summary()}")
    model.load_state_dict({k: mapped[k] for k in report.loaded}, strict=False)
    logger.info("published checkpoint mapped to passreid names:\n%s", report.summary())
    return model, report
