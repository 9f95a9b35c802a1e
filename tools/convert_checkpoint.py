"""Convert a PASS / DINO pre-training checkpoint into a passreid backbone export.

    python tools/convert_checkpoint.py checkpoint.pth backbone.pth
    python tools/convert_checkpoint.py checkpoint.pth student_backbone.pth --which student --arch vit_small

Accepted inputs:

* a published PASS/DINO ``checkpoint.pth``: ``{"student": {"module.backbone.*", "module.head.*"},
  "teacher": {"backbone.*", "head.*"}, "optimizer", "epoch", "args" (argparse.Namespace),
  "dino_loss", "fp16_scaler"}`` (PASS-reID ``PASS/main_pass.py``; its optimizer param groups hold the
  numpy.float64 lr / weight-decay schedule values, which the safe loader allows);
* a passreid pre-training ``checkpoint.pth``: ``{"model": PASSMetaArch.state_dict() (keys
  ``student.backbone.*``, ``teacher.backbone.*``, ``loss.center_*``), "optimizer", "config", ...}``,
  with or without the published ``student``/``teacher``/``dino_loss`` aliases;
* anything else :func:`passreid.models.extract_backbone_state_dict` understands.

A released fine-tuned checkpoint (TransReID / PASS-reID, DPM, TSD, DPEFormer, BPBReID) is recognised and
refused with what loads it instead (``finetune/test.py``, ``passreid.load_model``); an empty, text, truncated
or damaged file is named with what was expected (a ``torch.save`` zip archive).

The chosen network's backbone (``--which``, default the teacher, which fine-tuning uses) is loaded
strictly into a freshly built ViT and saved in the :func:`passreid.models.export_backbone` format
(part tokens and their positions kept), which ``passreid.models.load_pretrained`` reads. Every
entry that is not carried over is printed. The architecture, input size and patch size are taken
from ``--arch`` / the checkpoint's ``args`` or ``config`` where present and checked against the
weights, otherwise inferred from them. Exit status 2 on bad input, with the reason.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from passreid.cli import error_boundary
from passreid.config import add_debug_flag
from passreid.engine import atomic_save
from passreid.finetune.published_checkpoints import published_layout
from passreid.models import (
    VIT_ARCHS,
    ArchitectureError,
    CheckpointFormatError,
    CheckpointMismatchError,
    architecture_hints,
    build_vit,
    export_backbone,
    extract_backbone_state_dict,
    infer_vit_arguments,
    load_pretrained,
    read_checkpoint,
)
from passreid.pretrain.meta_arch import to_published_layout

EXPECTED = "a PASS/DINO pre-training checkpoint.pth (published or passreid) or a ViT backbone state dict"


class ConversionError(ValueError):
    """The input cannot be converted; the message says why and what was expected."""


def _refuse_finetuned(obj: Mapping[str, Any], path: Path) -> None:
    """A released fine-tuned checkpoint (TransReID-family or BPBReID) is named, with what loads it instead."""
    layout = published_layout(obj)
    if layout is None:
        return
    raise ConversionError(
        f"{path} is {layout.describe()}: a fine-tuned model, not a pre-training checkpoint (this tool expects "
        f"{EXPECTED}). Evaluate it with finetune/test.py --weights {path} --config-file <a {layout.method} config, "
        f"e.g. {layout.recipe}>, or load it with passreid.load_model(path, config)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="pre-training checkpoint.pth (published PASS/DINO or passreid)")
    parser.add_argument("output", type=Path, help="where to write the backbone export (.pth)")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher",
                        help="which network's backbone to export (default: teacher, what fine-tuning uses)")
    parser.add_argument("--arch", choices=sorted(VIT_ARCHS), default=None,
                        help="ViT architecture; default: from the checkpoint's args/config, else inferred from the weights")
    parser.add_argument("--hw-ratio", type=int, default=2,
                        help="height/width ratio of the pre-training input, used only when the checkpoint "
                             "records no input size (default 2, i.e. 256x128)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load with torch.load(weights_only=False); only for files you trust")
    add_debug_flag(parser)
    return parser


def _is_meta_arch_state(state: Any) -> bool:
    return isinstance(state, Mapping) and any(
        isinstance(k, str) and k.startswith(("student.", "teacher.")) for k in state
    )


def normalize_layout(obj: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Turn a passreid training checkpoint into the published layout; returns (checkpoint, notes).

    A checkpoint that already has ``teacher``/``student`` is returned unchanged (its ``model`` alias,
    if any, is reported as dropped by the extraction).
    """
    obj = dict(obj)
    has_published = any(isinstance(obj.get(k), Mapping) for k in ("teacher", "student"))
    if has_published or not _is_meta_arch_state(obj.get("model")):
        return obj, []
    published = to_published_layout(obj.pop("model"))
    notes = ["model: passreid PASSMetaArch state dict, read as student/teacher/dino_loss"]
    return {**obj, **published}, notes


def _expand_dropped(obj: Mapping[str, Any], dropped: list[str]) -> list[str]:
    """Every dropped entry by name: ``X/*`` of a tensor dict becomes ``X/<key>`` per key."""
    expanded: list[str] = []
    for entry in dropped:
        name = entry[:-2] if entry.endswith("/*") else None
        inner = obj.get(name) if name is not None else None
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            expanded += [f"{name}/{key}" for key in inner]
        else:
            expanded.append(entry)
    reported = {e.split("/", 1)[0] for e in dropped if "/" in e}
    for key, value in obj.items():
        if key not in reported and not isinstance(value, (Mapping, torch.Tensor)):
            expanded.append(f"{key} ({type(value).__name__})")
    return expanded


def convert(input_path: Path, output_path: Path, which: str = "teacher", arch: str | None = None,
            hw_ratio: int = 2, trust_pickle: bool = False) -> dict[str, Any]:
    """Convert ``input_path`` and write the export to ``output_path``; returns a summary dict."""
    try:
        raw = read_checkpoint(input_path, weights_only=not trust_pickle)
    except (FileNotFoundError, CheckpointFormatError) as error:
        raise ConversionError(str(error)) from error
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{input_path} holds a {type(raw).__name__}, not a checkpoint dict; expected {EXPECTED}")
    _refuse_finetuned(raw, input_path)
    obj, notes = normalize_layout(raw)
    try:
        state, dropped = extract_backbone_state_dict(obj, which=which)
    except CheckpointFormatError as error:
        raise ConversionError(f"{input_path}: {error}") from error
    try:  # an explicit --arch wins over the arch recorded in args/config
        settings = infer_vit_arguments(state, architecture_hints(obj), hw_ratio, arch=arch)
    except ArchitectureError as error:
        raise ConversionError(f"{input_path}: {error}") from error
    arch_name = settings.pop("arch")
    model = build_vit(arch_name, **settings)
    try:
        report = load_pretrained(model, state, label=str(input_path))  # strict: any difference raises
    except CheckpointMismatchError as error:
        raise ConversionError(f"{input_path}: the {which} backbone does not load into {arch_name}: {error}") from error
    metadata: dict[str, Any] = {"source": str(input_path), "which": which}
    if isinstance(obj.get("epoch"), int):
        metadata["epoch"] = obj["epoch"]
    atomic_save(export_backbone(model, arch_name, **metadata), output_path)
    return {"arch": arch_name, **settings, "loaded": len(report.loaded), "notes": notes,
            "dropped": _expand_dropped(obj, dropped)}


@error_boundary(extra=(ConversionError,))
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.output.parent.is_dir():
        raise ConversionError(f"output directory {args.output.parent} does not exist")
    summary = convert(args.input, args.output, args.which, args.arch, args.hw_ratio, args.trust_pickle)
    for note in summary["notes"]:
        print(f"note: {note}")
    for entry in summary["dropped"]:
        print(f"dropped: {entry}")
    print(
        f"wrote {args.output}: {args.which} backbone, {summary['arch']} img_size={list(summary['img_size'])} "
        f"patch={summary['patch_size']} part_tokens={summary['num_part_tokens']}, {summary['loaded']} tensors "
        f"({len(summary['dropped'])} entries dropped)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
