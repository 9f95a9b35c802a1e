"""Reading fine-tuned models: passreid's ``model_final.pth`` (:mod:`passreid.models.reid_file`, written by every
re-ID stage), a run's ``checkpoint.pth``, and any released checkpoint (through
:mod:`passreid.finetune.published_checkpoints`). :func:`load_finetuned_model` rebuilds the model of any
fine-tuning method from the stored config alone.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from passreid.config import config_from_dict, config_to_dict
from passreid.config.loader import without_removed_keys
from passreid.engine import unwrap_model
from passreid.finetune.config import FinetuneConfig, validate_config
from passreid.finetune.methods import build_model
from passreid.finetune.published_checkpoints import (EXPECTED_FINETUNED_FILES, load_published_checkpoint,
                                                     published_layout)
from passreid.models import CheckpointFormatError, CheckpointMismatchError, LoadReport, read_checkpoint
from passreid.models.reid_file import FINAL_FORMAT, FINAL_FORMAT_VERSION, pretraining_file_kind, reid_model_file

__all__ = [
    "build_final_checkpoint",
    "load_finetuned_model",
    "stored_config",
]

logger = logging.getLogger(__name__)


def build_final_checkpoint(model: nn.Module, cfg: FinetuneConfig, num_classes: int, num_cameras: int) -> dict:
    """The ``model_final.pth`` dict of a fine-tuning run: ``model`` trained with ``cfg`` (stored whole)."""
    return reid_model_file(unwrap_model(model), cfg.model, num_classes, num_cameras, method=cfg.method,
                           config=config_to_dict(cfg))


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
    stored = without_removed_keys(raw)  # files written before the demo world left the stages
    return validate_config(config_from_dict(FinetuneConfig, stored, source=f"{label} (stored config)"))


def _training_counts(checkpoint: Mapping[str, Any], label: str) -> tuple[int, int]:
    """(num_classes, num_cameras) of a run's ``checkpoint.pth``: stored in its ``extra`` by the fine-tuning
    trainer; files written before that hold them only in ReIDModel tensor shapes."""
    extra = checkpoint.get("extra")
    if isinstance(extra, Mapping) and "num_classes" in extra and "num_cameras" in extra:
        return int(extra["num_classes"]), int(extra["num_cameras"])
    return _counts_from_state(checkpoint["model"], label)


def _counts_from_state(state: Mapping[str, Tensor], label: str) -> tuple[int, int]:
    """(num_classes, num_cameras) of a passreid ReIDModel state dict, from the tensor shapes."""
    if "head.classifier.weight" not in state:
        raise CheckpointFormatError(f"{label}: no 'head.classifier.weight' and no stored num_classes (a checkpoint "
                                    "of another method written by an older passreid?); cannot tell the number of "
                                    "classes: evaluate the run's model_final.pth instead")
    num_cameras = state["sie_embed"].shape[0] if "sie_embed" in state else 0
    return int(state["head.classifier.weight"].shape[0]), int(num_cameras)


def load_finetuned_model(
    source: str | os.PathLike | Mapping[str, Any],
    cfg: FinetuneConfig | None = None,
    *,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    label: str | None = None,
) -> tuple[nn.Module, FinetuneConfig, LoadReport | None]:
    """Rebuild a fine-tuned model from a file; returns ``(model in eval mode, config it was built with, report)``.

    * ``model_final.pth``: everything comes from the file (``cfg`` is not needed, and ignored for the
      model; a differing ``cfg.model`` is logged);
    * a run's ``checkpoint.pth``: the model config is the one stored in it;
    * a released TransReID / PASS-reID, DPM, TSD, DPEFormer or BPBReID checkpoint: ``cfg`` describes the
      architecture (method, backbone, head, JPM, SIE, size, stride, parts); keys are mapped and reported
      (``report``), see :func:`load_published_checkpoint`.

    ``label`` names the source in errors (default: the path, or ``<in-memory checkpoint>``). A file that is
    none of these raises :class:`CheckpointFormatError` saying what it holds and what was expected.
    """
    label, obj = _read(source, label)
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
    _refuse_pretraining_file(obj, label)
    if "config" in obj and "iteration" in obj and isinstance(obj.get("model"), Mapping):
        stored = _config_of(obj["config"], label)
        num_classes, num_cameras = _training_counts(obj, label)
        model = build_model(stored, num_classes, num_cameras, load_weights=False)
        _load_strict(model, obj["model"], label)
        _log_model_differences(stored, cfg, label)
        return model.eval(), stored, None
    if cfg is None:
        layout = published_layout(obj)
        found = f"it is {layout.describe()}" if layout else "no 'meta'/'config'"
        example = f", e.g. {layout.recipe}" if layout else ""
        raise CheckpointFormatError(
            f"{label} is not a passreid fine-tuned model ({found}); pass the config that describes its "
            f"architecture (--config-file{example}) to load a released checkpoint; expected {EXPECTED_FINETUNED_FILES}"
        )
    model, report = load_published_checkpoint(obj, cfg, label=label, allow_missing=allow_missing,
                                              allow_unexpected=allow_unexpected)
    return model.eval(), cfg, report


def _read(source: str | os.PathLike | Mapping[str, Any], label: str | None) -> tuple[str, Mapping[str, Any]]:
    """``(label, checkpoint dict)`` of a path or an already-loaded checkpoint."""
    if isinstance(source, (str, os.PathLike)):
        label, obj = label or str(source), read_checkpoint(source)
    else:
        label, obj = label or "<in-memory checkpoint>", source
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{label} holds a {type(obj).__name__}, not a checkpoint dict; expected "
                                    f"{EXPECTED_FINETUNED_FILES}")
    return label, obj


def _refuse_pretraining_file(obj: Mapping[str, Any], label: str) -> None:
    """A pre-training checkpoint also stores a config and an iteration: say what it is instead of reading it."""
    kind = pretraining_file_kind(obj)
    if kind is not None:
        what = "a pre-training checkpoint" if kind == "pretrain_checkpoint" else "a backbone export"
        raise CheckpointFormatError(
            f"{label} is {what}, which holds no re-ID head: fine-tune from it first (finetune/train.py "
            f"model.pretrained={label}), or extract its features with tools/extract_features.py; "
            f"expected {EXPECTED_FINETUNED_FILES}")


def stored_config(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The config dict stored in a passreid ``model_final.pth`` or training ``checkpoint.pth`` (keys an older
    version wrote and this one removed are left out, so the dict builds a current config)."""
    label, obj = _read(source, None)
    meta = obj.get("meta")
    if isinstance(meta, Mapping) and meta.get("format") == FINAL_FORMAT and isinstance(meta.get("config"), Mapping):
        return without_removed_keys(meta["config"])
    _refuse_pretraining_file(obj, label)
    if isinstance(obj.get("config"), Mapping) and "iteration" in obj:
        return without_removed_keys(obj["config"])
    raise CheckpointFormatError(f"{label} stores no passreid fine-tuning config (a released checkpoint?); "
                                "pass --config-file describing its architecture and test set")


def _log_model_differences(stored: FinetuneConfig, given: FinetuneConfig | None, label: str) -> None:
    if given is None:
        return
    stored_model, given_model = config_to_dict(stored.model), config_to_dict(given.model)
    differing = [k for k in stored_model if k != "pretrained" and stored_model[k] != given_model.get(k)]
    if differing or stored.method != given.method:
        logger.warning("%s was built with a different method or model config than the one given; the model is "
                       "rebuilt from the file's config (method %s, differing keys: %s)", label, stored.method,
                       ", ".join(f"model.{k}={stored_model[k]!r}" for k in differing) or "none")
