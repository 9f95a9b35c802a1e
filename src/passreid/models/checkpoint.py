"""Backbone checkpoint reading, conversion and loud, reported loading into :class:`VisionTransformer`.

One file of ~650 lines on purpose: safe reading, backbone extraction from every published layout, position
resizing and the reported load are one pipeline that every stage and tool goes through, and each step's
error message reports what the earlier steps found.

Accepted inputs (``extract_backbone_state_dict``):

(a) a PASS/DINO pre-training ``checkpoint.pth``: ``{"student": {"module.backbone.*", "module.head.*"},
    "teacher": {"backbone.*", "head.*"}, "optimizer", "epoch", "args", "dino_loss", ...}``
    (PASS-reID: PASS/main_pass.py, ``save_dict``); the ``teacher`` (default) or ``student`` backbone is taken;
(b) a converted flat backbone state dict (PASS-reID: PASS/convert_model_dino.py output);
(c) a passreid backbone export ``{"backbone": state_dict, "arch": ..., "img_size": ...,
    "patch_size": ..., "stride_size": ..., "num_part_tokens": ...}`` (see :func:`export_backbone`);
(d) a timm / DINO / TransReID-SSL ViT state dict whose ``pos_embed`` (1, 1+N, D) has a [CLS] slot:
    the slot becomes ``cls_pos`` and ``pos_embed`` keeps the N patch rows;
(e) any of these wrapped as ``{"model": ...}`` or ``{"state_dict": ...}``.

``head.*``, ``pre_logits.*`` and distillation-token weights are dropped and reported.
:func:`read_checkpoint` is the one reader of weight files: ``torch.load(weights_only=True)`` admitting
``argparse.Namespace``, numpy numeric scalars (which published PASS/DINO checkpoints pickle) and yacs configs
(which torchreid / BPBReID checkpoints pickle; read as ``OrderedDict``), and one
:class:`CheckpointFormatError` naming the file for anything that is not a ``torch.save`` checkpoint.
:func:`architecture_hints` + :func:`infer_vit_arguments` give the ``build_vit`` arguments of a backbone
state dict (what ``tools/convert_checkpoint.py`` and ``passreid.inference`` build).
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import logging
import math
import os
import pickle
import re
import zipfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from passreid.models.vit import VIT_ARCHS, patch_grid_size

__all__ = [
    "ArchitectureError",
    "CheckpointMismatchError",
    "CheckpointFormatError",
    "LoadReport",
    "TORCH_SAVE_FORMAT",
    "check_torch_file",
    "read_checkpoint",
    "extract_backbone_state_dict",
    "export_backbone",
    "group_keys",
    "infer_pretrain_grid",
    "resize_pos_embed",
    "load_pretrained",
    "matches_any",
    "architecture_hints",
    "infer_vit_arguments",
]

logger = logging.getLogger(__name__)

# Key prefixes of weights that are never part of the backbone (TransReID/SSL loaders skip the same).
_NON_BACKBONE_PREFIXES = ("head.", "head_dist.", "pre_logits.")
_NON_BACKBONE_KEYS = ("dist_token",)
_TRAINING_CHECKPOINT_KEYS = ("teacher", "student")
_WRAPPER_KEYS = ("model", "state_dict")
_PART_TOKEN = re.compile(r"^part_token(\d+)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_VIT_KEYS = ("cls_token", "patch_embed.proj.weight", "pos_embed")


#: The backbone weight files :func:`load_pretrained` reads (named in its errors).
_BACKBONE_SOURCES = ("a ViT backbone: a passreid export (backbone.pth), a PASS/DINO pre-training checkpoint.pth, "
                     "or a converted / timm ViT state dict")


class CheckpointMismatchError(RuntimeError):
    """Checkpoint keys/shapes do not match the model and the caller did not allow the difference."""


class CheckpointFormatError(ValueError):
    """The object is not one of the checkpoint layouts passreid understands."""


class ArchitectureError(ValueError):
    """The ViT that a backbone state dict belongs to cannot be determined, or conflicts with the request."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    ``shape_mismatched`` holds ``(key, checkpoint shape, model shape)``; ``resized`` holds
    ``(key, old grid, new grid)``; ``dropped`` lists checkpoint entries discarded before matching
    (heads, the other network of a student/teacher pair, optimizer state, ...).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    resized: list[tuple[str, tuple[int, int], tuple[int, int]]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    num_model_tensors: int = 0

    def match(self, state: Mapping[str, Tensor], model_state: Mapping[str, Tensor]) -> None:
        """Sort every model tensor into loaded / missing / shape-mismatched against ``state`` (already mapped
        to the model's names) and list the entries of ``state`` the model has no place for as unexpected."""
        self.num_model_tensors = len(model_state)
        for key, target in model_state.items():
            if key not in state:
                self.missing.append(key)
            elif state[key].shape != target.shape:
                self.shape_mismatched.append((key, tuple(state[key].shape), tuple(target.shape)))
            else:
                self.loaded.append(key)
        self.unexpected.extend(k for k in state if k not in model_state)

    @property
    def is_exact(self) -> bool:
        """True when every model tensor was loaded and nothing in the checkpoint was left over."""
        return not (self.missing or self.unexpected or self.shape_mismatched)

    def summary(self) -> str:
        """Multi-line human-readable report, starting with ``Loaded n / m tensors from <source>``."""
        lines = [f"Loaded {len(self.loaded)} / {self.num_model_tensors} tensors from {self.source}"]
        for key, old, new in self.resized:
            lines.append(f"  resized {key}: grid {old[0]}x{old[1]} -> {new[0]}x{new[1]}")
        if self.missing:
            lines.append(f"  missing in checkpoint ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected in checkpoint ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for key, ckpt_shape, model_shape in self.shape_mismatched:
            lines.append(f"  shape mismatch {key}: checkpoint {list(ckpt_shape)} vs model {list(model_shape)}")
        if self.dropped:
            lines.append(f"  dropped before matching ({len(self.dropped)}): {group_keys(self.dropped)}")
        return "\n".join(lines)


def group_keys(keys: Sequence[str], depth: int = 2, min_group: int = 4) -> str:
    """``keys`` joined by commas, every run of at least ``min_group`` plain parameter names under the same first
    ``depth`` components written once as ``<prefix>.* (n)``: a PASS training checkpoint's 36 head tensors read
    ``teacher.head.* (36)``. Entries with a reason (``"base.fc.weight (unused ...)"``) stay whole."""
    def prefix(key: str) -> str | None:
        parts = key.split(".")
        return ".".join(parts[:depth]) if " " not in key and len(parts) > depth else None

    counts = Counter(prefix(key) for key in keys)
    shown, written = [], set()
    for key in keys:
        group = prefix(key)
        if group is None or counts[group] < min_group:
            shown.append(key)
        elif group not in written:
            written.add(group)
            shown.append(f"{group}.* ({counts[group]})")
    return ", ".join(shown)


# --------------------------------------------------------------------------- reading
#: What every weights file must be; error messages name it.
TORCH_SAVE_FORMAT = "a PyTorch checkpoint written by torch.save (a zip archive)"
_ZIP_MAGIC = b"PK"
_PICKLE_PROTO = b"\x80"  # torch.save before PyTorch 1.6 (and _use_new_zipfile_serialization=False): a pickle
# Numeric numpy scalar types that published checkpoints pickle (PASS/DINO main_pass.py writes the lr and
# weight-decay schedule values, numpy.float64, into the optimizer's param groups every iteration).
_NUMPY_SCALAR_CODES = "?bhilqBHILQefd"


def _safe_globals() -> list[Any]:
    """The globals ``weights_only`` loading allows beyond tensors and containers.

    ``argparse.Namespace`` (the ``args`` of PASS/DINO checkpoints: a bag of attributes whose values are
    themselves unpickled under the same restrictions); numpy's numeric scalars: the scalar
    re-constructor under its numpy 1.x name ``numpy.core.multiarray.scalar`` and numpy 2.x name
    ``numpy._core.multiarray.scalar``, ``numpy.dtype`` and the dtype classes of bool / int / uint / float
    (object, string and structured dtypes, and numpy arrays, stay refused); and, from torch 2.6, the name
    ``yacs.config.CfgNode`` read as :class:`collections.OrderedDict`: torchreid's ``save_checkpoint`` (BPBReID)
    pickles its yacs config, a ``dict`` subclass pickled as its items plus a ``__dict__`` of four bookkeeping
    entries (bool, set, dict), so the same items come back as an ``OrderedDict`` (the entries as its
    attributes) and no yacs code runs, or needs to be installed.
    """
    import numpy as np

    scalar = np.float64(0).__reduce__()[0]
    dtype_classes = {type(np.dtype(code)) for code in _NUMPY_SCALAR_CODES}
    allowed: list[Any] = [argparse.Namespace, np.dtype, *sorted(dtype_classes, key=str)]
    if torch.__version__ >= "2.6":  # (global, name) entries: an allowed object under another pickled name
        allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
                    (OrderedDict, "yacs.config.CfgNode")]
    else:
        allowed.append(scalar)
    return allowed


def _describe_start(head: bytes) -> str:
    """The first bytes of a file, as text when they are text."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"the bytes {head[:8].hex(' ')}"
    if text.strip() and all(c.isprintable() or c.isspace() for c in text):
        first_line = text.strip().splitlines()[0]
        return f"the text {first_line[:60]!r} (a text or HTML file, e.g. an error page saved instead of the download?)"
    return f"the bytes {head[:8].hex(' ')}"


def check_torch_file(path: Path) -> None:
    """Raise :class:`CheckpointFormatError` naming ``path`` unless it looks like a ``torch.save`` file.

    Cheap: reads the first bytes and, for a zip archive, its central directory (which a truncated file
    has lost), so an empty, text, truncated or foreign file is named before ``torch.load`` runs.
    """
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not head:
        raise CheckpointFormatError(f"{path} is empty (0 bytes); expected {TORCH_SAVE_FORMAT}")
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise CheckpointFormatError(
                f"{path} is a damaged or truncated zip archive ({path.stat().st_size} bytes; {error}), e.g. from "
                f"an interrupted download, copy or write; expected {TORCH_SAVE_FORMAT}"
            ) from error
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            raise CheckpointFormatError(
                f"{path} is a zip archive but not a torch.save checkpoint (no data.pkl; it holds "
                f"{', '.join(names[:5]) or 'nothing'}); expected {TORCH_SAVE_FORMAT}"
            )
        return
    if not head.startswith(_PICKLE_PROTO):
        raise CheckpointFormatError(
            f"{path} is not a PyTorch checkpoint: it starts with {_describe_start(head)}; expected {TORCH_SAVE_FORMAT}"
        )


def _refused_globals(path: Path) -> list[str]:
    """Globals in the file that the safe loader refuses (empty when torch cannot list them)."""
    lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    if lister is None:
        return []
    try:
        found = lister(str(path))
    except (RuntimeError, pickle.UnpicklingError, ValueError, OSError):
        return []
    allowed = set()
    for entry in _safe_globals():
        allowed.add(entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}")
    return [name for name in found if name not in allowed]


def read_checkpoint(path: str | os.PathLike, *, weights_only: bool = True) -> Any:
    """``torch.load`` a checkpoint onto the CPU; every failure is one error that names ``path``.

    A missing file raises ``FileNotFoundError``; an empty, text, truncated or otherwise unreadable file
    :class:`CheckpointFormatError` saying what it found and that :data:`TORCH_SAVE_FORMAT` was expected.
    With ``weights_only=True`` only tensors, containers and the globals of :func:`_safe_globals`
    (``argparse.Namespace``, numpy numeric scalars, yacs configs) are unpickled; a file with anything else raises
    :class:`CheckpointFormatError` listing it. Pass ``weights_only=False`` only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    check_torch_file(path)
    # safe_globals exists from torch 2.5; older torch refuses Namespace / numpy scalars with the error below.
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    allowed = safe_globals(_safe_globals()) if safe_globals and weights_only else contextlib.nullcontext()
    try:
        with allowed:
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as error:
        refused = _refused_globals(path) if weights_only else []
        if refused:
            raise CheckpointFormatError(
                f"{path} pickles objects that weights-only loading refuses: {', '.join(refused)} (allowed: "
                "tensors, containers, argparse.Namespace, numpy numeric scalars, yacs configs). If you trust the file, load "
                "it with read_checkpoint(path, weights_only=False) or tools/convert_checkpoint.py --trust-pickle."
            ) from error
        raise _unreadable(path, error) from error
    except (ImportError, AttributeError) as error:  # weights_only=False: a pickled class whose code is absent here
        raise CheckpointFormatError(
            f"{path} pickles an object whose code cannot be imported here ({type(error).__name__}: {error}); install "
            "the package that defines it, or read the file without trusting its pickles"
        ) from error
    except (RuntimeError, OSError, EOFError, ValueError, LookupError, TypeError) as error:
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: BaseException) -> CheckpointFormatError:
    text = str(error)
    marker = "WeightsUnpickler error:"  # torch's weights-only message: the reason follows its long preamble
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0] if lines else ""
    return CheckpointFormatError(
        f"{path} cannot be read as {TORCH_SAVE_FORMAT}: {type(error).__name__}: {reason[:300]}. The file is "
        "probably damaged or incompletely copied."
    )


# ------------------------------------------------------------------------ extraction
def _as_tensor_dict(raw: Mapping[str, Any], where: str) -> dict[str, Tensor]:
    not_tensors = [k for k, v in raw.items() if not isinstance(v, Tensor)]
    if not_tensors:
        shown = ", ".join(f"{k!r} ({type(raw[k]).__name__})" for k in not_tensors[:8])
        raise CheckpointFormatError(
            f"{where}: expected a state dict of tensors (or a PASS/DINO checkpoint with 'teacher'/"
            f"'student', a passreid export with 'backbone', or a {{'model'|'state_dict': ...}} "
            f"wrapper), but these entries are not tensors: {shown}"
        )
    return dict(raw)


def _strip_prefix(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def _select_backbone(state: dict[str, Tensor], label: str) -> tuple[dict[str, Tensor], list[str]]:
    """Strip ``module.``; keep only ``backbone.*`` when present; drop head/distillation weights."""
    state = {_strip_prefix(k, "module."): v for k, v in state.items()}
    dropped: list[str] = []
    if any(k.startswith("backbone.") for k in state):
        dropped += [f"{label}{k}" for k in state if not k.startswith("backbone.")]
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    kept: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(_NON_BACKBONE_PREFIXES) or key in _NON_BACKBONE_KEYS:
            dropped.append(f"{label}{key}")
        else:
            kept[key] = value
    has_dist_token = "dist_token" in state
    dropped += _split_cls_position_slot(kept, has_dist_token)
    return kept, dropped


def _split_cls_position_slot(state: dict[str, Tensor], has_dist_token: bool) -> list[str]:
    """Convert the timm/DINO ``pos_embed`` (1, 1[+1]+N, D) to ``cls_pos`` + patch-only ``pos_embed``.

    A state dict with ``cls_token`` but neither ``cls_pos`` nor part tokens follows the timm/DINO
    convention, where the first position slot belongs to [CLS] (and the second to the DeiT
    distillation token, dropped). A PASS-layout dict that merely lacks ``cls_pos`` is left alone, so
    the key is reported missing instead of being invented from a patch position.
    """
    pass_layout = "cls_pos" in state or any(k.startswith("part_token") for k in state)
    if pass_layout or "pos_embed" not in state or "cls_token" not in state:
        return []
    if "reg_token" in state:
        raise CheckpointFormatError(
            "state dict has register tokens ('reg_token'); ViTs with registers are not supported"
        )
    pos = state["pos_embed"]
    prefix = 2 if has_dist_token else 1
    if pos.ndim != 3 or pos.shape[1] <= prefix:
        raise CheckpointFormatError(
            f"pos_embed with a [CLS] slot should be shaped (1, {prefix}+N, D), got {tuple(pos.shape)}"
        )
    state["cls_pos"] = pos[:, :1].clone()
    state["pos_embed"] = pos[:, prefix:].clone()
    return ["pos_embed[distillation-token slot]"] if has_dist_token else []


def extract_backbone_state_dict(
    obj: Mapping[str, Any], which: str = "teacher"
) -> tuple[dict[str, Tensor], list[str]]:
    """Backbone state dict in passreid/PASS key names from any supported layout (module docstring).

    ``which`` picks ``"teacher"`` (what fine-tuning uses) or ``"student"`` from a pre-training
    checkpoint. Returns ``(state_dict, dropped)``: ``dropped`` names every discarded weight, and
    other top-level tensor/dict entries of a training checkpoint as ``"<name>/*"``.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(
            f"expected a checkpoint dict, got {type(obj).__name__}; pass a path or a loaded dict"
        )
    if any(isinstance(obj.get(k), Mapping) for k in _TRAINING_CHECKPOINT_KEYS):
        if which not in _TRAINING_CHECKPOINT_KEYS:
            raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
        if not isinstance(obj.get(which), Mapping):
            raise CheckpointFormatError(
                f"pre-training checkpoint has no {which!r} state dict (top-level keys: {sorted(obj)})"
            )
        container_key = which
    elif isinstance(obj.get("backbone"), Mapping):
        container_key = "backbone"
    else:
        container_key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)

    if container_key is None:
        state = _as_tensor_dict(obj, "checkpoint")
        return _select_backbone(state, label="")

    siblings = [
        f"{k}/*" for k, v in obj.items() if k != container_key and isinstance(v, (Mapping, Tensor))
    ]
    inner = obj[container_key]
    if container_key in _WRAPPER_KEYS:
        # A wrapper may hold any other layout, e.g. {"model": <PASS checkpoint>}.
        state, dropped = extract_backbone_state_dict(inner, which)
        return state, siblings + [f"{container_key}.{d}" for d in dropped]
    state = _as_tensor_dict(inner, f"checkpoint[{container_key!r}]")
    state, dropped = _select_backbone(state, label=f"{container_key}.")
    return state, siblings + dropped


def export_backbone(model: nn.Module, arch: str, /, **metadata: Any) -> dict[str, Any]:
    """The passreid backbone export (layout (c)): ``torch.save`` it as e.g. ``backbone.pth``.

    ``{"backbone": state_dict (CPU), "arch", "img_size", "patch_size", "stride_size",
    "num_part_tokens", **metadata}``; loads back with :func:`load_pretrained`.
    """
    patch_embed = model.patch_embed
    export = {
        "backbone": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "arch": arch,
        "img_size": list(model.img_size),
        "patch_size": patch_embed.patch_size,
        "stride_size": patch_embed.stride_size,
        "num_part_tokens": model.num_part_tokens,
    }
    clashes = set(metadata) & set(export)
    if clashes:
        raise ValueError(f"metadata keys {sorted(clashes)} would overwrite export fields")
    export.update(metadata)
    return export


# ------------------------------------------------------------------ position resize
def infer_pretrain_grid(num_patches: int, hw_ratio: int = 2) -> tuple[int, int]:
    """Grid of a pretrained patch-only ``pos_embed`` with ``num_patches`` rows.

    PASS/TransReID-SSL convention (PASS-reID: PASS_transreid/model/backbones/vit_pytorch.py, ``resize_pos_embed``): ``gs_h = int(sqrt(N * hw_ratio))``,
    ``gs_w = gs_h // hw_ratio`` (16x8 for N=128, hw_ratio=2). When that does not multiply back to N,
    a square grid (timm/ImageNet, e.g. 14x14) is tried.
    """
    if hw_ratio < 1:
        raise ValueError(f"hw_ratio must be a positive integer, got {hw_ratio}")
    grid_h = math.isqrt(num_patches * hw_ratio)
    grid_w = grid_h // hw_ratio
    if grid_h * grid_w == num_patches:
        return grid_h, grid_w
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return side, side
    raise CheckpointMismatchError(
        f"cannot infer the grid of a pretrained pos_embed with {num_patches} patches: hw_ratio="
        f"{hw_ratio} gives {grid_h}x{grid_w} and it is not square; pass the right hw_ratio"
    )


def resize_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Bilinear (``align_corners=False``) resize of patch-only positions ``(1, h*w, D)`` to a new grid."""
    old_h, old_w = old_grid
    if pos_embed.ndim != 3 or pos_embed.shape[1] != old_h * old_w:
        raise CheckpointMismatchError(
            f"pos_embed {tuple(pos_embed.shape)} does not hold a {old_h}x{old_w} patch grid"
        )
    dim = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    compute_dtype = torch.promote_types(pos_embed.dtype, torch.float32)
    grid = F.interpolate(grid.to(compute_dtype), size=tuple(new_grid), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)


# ------------------------------------------------------------------ architecture inference
def architecture_hints(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``arch`` / ``img_size`` / ``patch_size`` recorded with a pre-training checkpoint, where present.

    Read from a published PASS/DINO ``args`` Namespace (``arch``, ``height``/``width``, ``patch_size``)
    and a passreid ``config`` dict (``model.arch``, ``model.img_size``; these win over ``args``). Values
    that are not a known arch / a pair of sizes / an int are ignored; :func:`infer_vit_arguments`
    checks what is kept against the weights.
    """
    hints: dict[str, Any] = {}
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        values = vars(args)
        if values.get("arch") in VIT_ARCHS:
            hints["arch"] = values["arch"]
        if isinstance(values.get("height"), int) and isinstance(values.get("width"), int):
            hints["img_size"] = (values["height"], values["width"])
        if isinstance(values.get("patch_size"), int):
            hints["patch_size"] = values["patch_size"]
    config = obj.get("config")
    model_cfg = config.get("model") if isinstance(config, Mapping) else None
    if isinstance(model_cfg, Mapping):
        if model_cfg.get("arch") in VIT_ARCHS:
            hints["arch"] = model_cfg["arch"]
        if isinstance(model_cfg.get("img_size"), (list, tuple)) and len(model_cfg["img_size"]) == 2:
            hints["img_size"] = tuple(int(v) for v in model_cfg["img_size"])
    return hints


def _known_archs() -> dict[str, tuple[int, int]]:
    return {name: (spec.embed_dim, spec.depth) for name, spec in VIT_ARCHS.items()}


def _choose_arch(embed_dim: int, depth: int, arch: str | None, hints: Mapping[str, Any]) -> str:
    """The requested arch, else the recorded one, else the first known ViT of that width and depth."""
    matching = [name for name, shape in _known_archs().items() if shape == (embed_dim, depth)]
    chosen = arch or hints.get("arch")
    if chosen is None:
        if not matching:
            raise ArchitectureError(f"the backbone has embed_dim {embed_dim} and depth {depth}, which no known ViT "
                                    f"has (known: {_known_archs()})")
        return matching[0]
    where = "requested" if arch else "recorded in the checkpoint's args/config"
    if chosen not in VIT_ARCHS:
        raise ArchitectureError(f"arch {chosen!r} ({where}) is not a known ViT; expected one of {sorted(VIT_ARCHS)}")
    if chosen not in matching:
        spec = VIT_ARCHS[chosen]
        raise ArchitectureError(
            f"arch {chosen!r} has embed_dim {spec.embed_dim} and depth {spec.depth}, but the checkpoint's backbone "
            f"has embed_dim {embed_dim} and depth {depth} (arch {where}; "
            + (f"the weights match {matching})" if matching else f"known: {_known_archs()})")
        )
    return chosen


def infer_vit_arguments(
    state: Mapping[str, Tensor], hints: Mapping[str, Any], hw_ratio: int = 2, arch: str | None = None
) -> dict[str, Any]:
    """``build_vit`` keyword arguments (``arch`` included) that rebuild the backbone of ``state``.

    ``state`` is a backbone state dict in passreid names (:func:`extract_backbone_state_dict`);
    ``hints`` come from :func:`architecture_hints`. The arch is ``arch`` when given, else the recorded
    one, else inferred from the width and depth of the weights; it must agree with the weights. Patches
    are non-overlapping (``stride_size = patch_size``), as in pre-training. The input size is the
    recorded one, else the pos_embed grid for ``hw_ratio`` (:func:`infer_pretrain_grid`) times the
    patch size. Raises :class:`ArchitectureError` saying what does not fit.
    """
    absent = [key for key in _VIT_KEYS if key not in state]
    if absent:
        raise ArchitectureError(
            f"the extracted backbone has no {' / '.join(absent)}; keys start with {sorted(state)[:6]}: "
            "is this a ViT checkpoint?"
        )
    embed_dim = int(state["cls_token"].shape[-1])
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    chosen = _choose_arch(embed_dim, depth, arch, hints)
    patch_size = int(state["patch_embed.proj.weight"].shape[-1])
    if hints.get("patch_size", patch_size) != patch_size:
        raise ArchitectureError(f"the checkpoint's args say patch_size {hints['patch_size']}, but the weights "
                                f"have {patch_size}")
    img_size = hints.get("img_size")
    if img_size is None:
        try:
            grid = infer_pretrain_grid(int(state["pos_embed"].shape[1]), hw_ratio)
        except CheckpointMismatchError as error:
            raise ArchitectureError(f"the checkpoint records no input size and inferring it from pos_embed "
                                    f"failed: {error}") from error
        img_size = (grid[0] * patch_size, grid[1] * patch_size)
    num_parts = sum(1 for k in state if _PART_TOKEN.match(k))
    return dict(arch=chosen, img_size=tuple(img_size), patch_size=patch_size, stride_size=patch_size,
                num_part_tokens=num_parts)


# ---------------------------------------------------------------------------- loading
def matches_any(key: str, patterns: Iterable[str]) -> bool:
    """Whether ``key`` equals one of ``patterns`` or matches it as an fnmatch pattern (case-sensitive)."""
    return any(key == p or fnmatch.fnmatchcase(key, p) for p in patterns)


def _export_grid(obj: Mapping[str, Any]) -> tuple[int, int] | None:
    """Exact pos_embed grid recorded in a passreid export (layout (c)), else None."""
    if not isinstance(obj.get("backbone"), Mapping):
        return None
    try:
        return patch_grid_size(tuple(obj["img_size"]), int(obj["patch_size"]), int(obj["stride_size"]))
    except (KeyError, TypeError, ValueError):
        return None


def _resize_positions_if_needed(
    state: dict[str, Tensor],
    model: nn.Module,
    model_state: Mapping[str, Tensor],
    hw_ratio: int,
    recorded_grid: tuple[int, int] | None,
) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    pos, target = state.get("pos_embed"), model_state.get("pos_embed")
    if pos is None or target is None or pos.shape == target.shape:
        return []
    resizable = (
        pos.ndim == 3 and pos.shape[0] == 1 and pos.shape[2] == target.shape[2] and hasattr(model, "pos_grid")
    )
    if not resizable:
        return []  # reported as a shape mismatch
    if recorded_grid is not None and recorded_grid[0] * recorded_grid[1] == pos.shape[1]:
        old_grid = recorded_grid
    else:
        old_grid = infer_pretrain_grid(pos.shape[1], hw_ratio)
    new_grid = tuple(model.pos_grid)
    state["pos_embed"] = resize_pos_embed(pos, old_grid, new_grid)
    return [("pos_embed", old_grid, new_grid)]


def load_pretrained(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    hw_ratio: int = 2,
    which: str = "teacher",
    weights_only: bool = True,
    label: str | None = None,
) -> LoadReport:
    """Load backbone weights into ``model`` and report exactly what happened; never silently partial.

    ``source`` is a path or an already-loaded checkpoint in any layout of
    :func:`extract_backbone_state_dict`; ``label`` names it in the report and errors (default: the path,
    or ``<in-memory checkpoint>``). ``pos_embed`` of another grid is resized bilinearly and
    reported in ``resized``; the old grid is the one recorded in a passreid export, otherwise it is
    inferred from ``hw_ratio`` (see :func:`infer_pretrain_grid`).

    The report is logged. Raises :class:`CheckpointMismatchError` listing the offending keys unless
    every missing key matches a name/fnmatch pattern in ``allow_missing`` and every unexpected key one
    in ``allow_unexpected``. A shape-mismatched key leaves the model's tensor as it was, like a missing
    key, so it is tolerated only when it matches ``allow_missing``. A source that holds none of the
    model's tensors (another kind of file) raises :class:`CheckpointFormatError` naming what it holds.
    Example: ``load_pretrained(vit, timm_sd, allow_missing=("part*",))``.
    """
    if isinstance(source, (str, os.PathLike)):
        label = label or str(source)
        obj = read_checkpoint(source, weights_only=weights_only)
    elif isinstance(source, Mapping):
        label, obj = label or "<in-memory checkpoint>", source
    else:
        raise TypeError(f"source must be a path or a checkpoint dict, got {type(source).__name__}")

    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{label} holds a {type(obj).__name__}, not a checkpoint dict; expected "
                                    f"{_BACKBONE_SOURCES}")
    try:
        state, dropped = extract_backbone_state_dict(obj, which=which)
    except CheckpointFormatError as error:
        raise CheckpointFormatError(f"{label}: {error}") from error
    model_state = model.state_dict()
    if not any(key in model_state for key in state):
        shown = ", ".join(sorted(state)[:6]) or "no tensors"
        raise CheckpointFormatError(
            f"{label} holds none of the {len(model_state)} backbone tensors of the model (it holds {shown}"
            f"{', ...' if len(state) > 6 else ''}); expected {_BACKBONE_SOURCES}"
        )
    resized = _resize_positions_if_needed(state, model, model_state, hw_ratio, _export_grid(obj))

    report = LoadReport(source=label, dropped=dropped, resized=resized)
    report.match(state, model_state)

    refused = [k for k in report.missing if not matches_any(k, allow_missing)]
    refused += [k for k, _, _ in report.shape_mismatched if not matches_any(k, allow_missing)]
    refused += [f"{k} (unexpected)" for k in report.unexpected if not matches_any(k, allow_unexpected)]
    if refused:
        logger.error(report.summary())
        raise CheckpointMismatchError(
            f"checkpoint {label} does not match the model; not allowed: {', '.join(refused)}. "
            "Pass allow_missing=/allow_unexpected= names or fnmatch patterns to accept them.\n"
            + report.summary()
        )

    result = model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    # BatchNorm keeps its own num_batches_tracked when a (pre-1.0 torch) file lacks it, without reporting it
    def counted(keys: Iterable[str]) -> set[str]:
        return {k for k in keys if not k.endswith("num_batches_tracked")}

    if result.unexpected_keys or counted(result.missing_keys) != counted(set(model_state) - set(report.loaded)):
        raise RuntimeError(f"internal error: load_state_dict disagreed with the load report: {result}")
    logger.info(report.summary())
    return report
