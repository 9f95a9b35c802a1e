"""The re-ID model file, ``model_final.pth``: what fine-tuning, USL and UDA write at the end of a run and what
``finetune/test.py``, the tools and a UDA start read.

::

    {"model": state_dict,                      # ReIDModel (or a fine-tuning method's model), CPU tensors
     "meta": {"format": "passreid-finetune", "format_version": 1, "method",
              "arch", "img_size", "patch_size", "stride_size", "num_part_tokens",
              "num_classes", "num_cameras",     # training identities (USL: final clusters) / cameras
              "head", "feat_fusion", "multi_neck", "neck_feat", "sie", "sie_coe",
              "jpm", "jpm_num_branches", "jpm_shift", "jpm_shuffle_groups", "jpm_rearrange",
              "feature_dim", "config"}}         # config: a dict the fine-tuning config reads (below)

``config`` holds ``method`` and at least the shared sections ``model``, ``data`` and ``eval`` (a fine-tuning
run stores its whole resolved config; Cluster Contrast stores :func:`reid_file_config`), which is all a reader
needs to rebuild the network and its test pipeline (:func:`passreid.finetune.load_finetuned_model`). The
format name predates USL/UDA writing it and stays for the files already written.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from passreid.config import EvalConfig, ReIDDataConfig, ReIDModelConfig, config_to_dict

__all__ = ["FINAL_FORMAT", "FINAL_FORMAT_VERSION", "is_meta_arch_state", "pretraining_file_kind", "reid_file_config",
           "reid_model_file", "wrapped_state"]

FINAL_FORMAT = "passreid-finetune"
FINAL_FORMAT_VERSION = 1


def reid_model_file(model: nn.Module, model_cfg: ReIDModelConfig, num_classes: int, num_cameras: int, *,
                    method: str, config: dict[str, Any]) -> dict[str, Any]:
    """The ``model_final.pth`` dict (module docstring) of ``model`` (unwrapped), built from ``model_cfg`` by
    ``method``; ``config`` is the stored config dict."""
    m = model_cfg
    meta = {
        "format": FINAL_FORMAT,
        "format_version": FINAL_FORMAT_VERSION,
        "method": method,
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
        "config": config,
    }
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    return {"model": state, "meta": meta}


def _shared_fields(section: Any, base: type) -> dict[str, Any]:
    """The values of ``section`` for the fields of its shared base dataclass ``base`` (a stage's own keys,
    e.g. USL's ``model.init_from``, are left out)."""
    values = config_to_dict(section)
    return {f.name: values[f.name] for f in dataclasses.fields(base)}


def reid_file_config(method: str, model: ReIDModelConfig, data: ReIDDataConfig, eval_cfg: EvalConfig) -> dict[str, Any]:
    """The ``config`` of a model file written by a stage whose config is not the fine-tuning one: ``method``
    and the shared ``model`` / ``data`` / ``eval`` sections (the stage's full config goes in its own meta key)."""
    return {"method": method, "model": _shared_fields(model, ReIDModelConfig),
            "data": _shared_fields(data, ReIDDataConfig), "eval": config_to_dict(eval_cfg)}


def wrapped_state(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The state dict a checkpoint holds under ``model`` or ``state_dict`` (``None`` when neither is one)."""
    return next((obj[key] for key in ("model", "state_dict") if isinstance(obj.get(key), Mapping)), None)


def is_meta_arch_state(state: Any) -> bool:
    """Whether ``state`` is a passreid pre-training meta-architecture's state dict (``student.*`` / ``teacher.*``)."""
    return isinstance(state, Mapping) and any(str(k).startswith(("student.", "teacher.")) for k in state)


def pretraining_file_kind(obj: Any) -> str | None:
    """``"pretrain_checkpoint"`` for a PASS / DINO pre-training checkpoint (published or passreid's: a teacher and a
    student), ``"backbone_export"`` for a passreid backbone export, ``None`` for anything else. Neither holds a
    re-ID head: readers of re-ID model files use this to say so instead of failing on the content."""
    if not isinstance(obj, Mapping):
        return None
    published = any(isinstance(obj.get(key), Mapping) for key in ("teacher", "student"))
    if published or is_meta_arch_state(wrapped_state(obj)):
        return "pretrain_checkpoint"
    if isinstance(obj.get("backbone"), Mapping) and not isinstance(obj.get("meta"), Mapping):
        return "backbone_export"
    return None
