"""Use a trained model on your own images: load any supported weights file, extract features.

One file of ~570 lines on purpose: it is the public API of ``passreid`` for users (recognise a file, build the
model, read images, extract), and every tool's ``--weights`` argument goes through it; the parts are the
steps of that one path.

Two calls::

    from passreid import FeatureExtractor
    extractor = FeatureExtractor("runs/market/model_final.pth")      # GPU when present
    feats = extractor("my_images/")            # (N, D) float32 CPU tensor, images in sorted name order
    feats = extractor(["a.jpg", pil_image, numpy_hwc_uint8, tensor_chw_0_1])

:func:`load_model` recognises these files (:data:`WEIGHT_KINDS`, see :func:`identify_weights`):

* ``finetuned``: passreid ``model_final.pth`` of any fine-tuning method; feature = the model's eval
  forward (what ``finetune/test.py`` evaluates); methods with their own test distance keep it
  (:meth:`LoadedModel.test_distance`);
* ``finetune_checkpoint``: a fine-tuning run's ``checkpoint.pth`` (config stored inside);
* ``published_finetuned``: a released fine-tuned checkpoint of TransReID / PASS-reID (``base.*``,
  ``bottleneck*``, ``classifier*``), DPM, TSD, DPEFormer or BPBReID (torchreid, HRNet-W32 / ResNet-50)
  (``passreid.finetune.published_checkpoints.PUBLISHED_LAYOUTS``); needs the fine-tuning config that describes its
  architecture;
* ``backbone_export``: a pre-training backbone export (``backbone.pth`` / ``backbone_final.pth``,
  ``tools/convert_checkpoint.py`` output);
* ``pretrain_checkpoint``: a PASS / DINO pre-training ``checkpoint.pth`` (published, or passreid's own):
  the teacher backbone by default;
* ``backbone_state_dict``: a bare ViT state dict (converted DINO / timm layout).

Backbones (the last three) give the PASS test feature ``cat(CLS, mean(parts))`` (``backbone_feature=
"pass_fusion"``, the default; plain [CLS] when the ViT has no part tokens) or ``"cls"``, on images
prepared like the pre-training kNN monitor (bilinear resize to the backbone's input size, ImageNet
normalisation). Fine-tuned models use their config's input size and ``data.pixel_mean/std``.

A file that is not a ``torch.save`` checkpoint (empty, text, truncated) fails with
:class:`~passreid.models.CheckpointFormatError`; any other file with :class:`WeightsKindError`; both name the
file, say what it holds and what was expected.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from passreid.data.datasets import IMAGE_EXTENSIONS, is_image_file, list_image_files, parse_market_name
from passreid.data.images import read_image
from passreid.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from passreid.data.transforms import build_test_transform
from passreid.engine.logger import ConsoleHandler, ThroughputLogger
from passreid.eval.distance import DistanceChunkFn, FeatureDistance
from passreid.eval.features import ExtractedFeatures
from passreid.feature_inputs import resolve_device
from passreid.models import (VIT_ARCHS, ArchitectureError, CheckpointFormatError,
                             LoadReport, VisionTransformer, architecture_hints, build_vit,
                             extract_backbone_state_dict, infer_vit_arguments, load_pretrained, read_checkpoint)
from passreid.models.reid_file import FINAL_FORMAT, is_meta_arch_state, pretraining_file_kind, wrapped_state

__all__ = [
    "BACKBONE_FEATURES",
    "CLI_ERRORS",
    "FeatureExtractor",
    "FeatureNet",
    "LoadedModel",
    "WEIGHT_KINDS",
    "WeightsKindError",
    "add_model_arguments",
    "extracted",
    "identify_weights",
    "list_images",
    "load_model",
    "load_model_from_args",
    "parse_market_names",
]

logger = logging.getLogger(__name__)
progress_logger = logging.getLogger(f"{__name__}.progress")  # FeatureExtractor's progress lines

WEIGHT_KINDS = {
    "finetuned": "passreid model_final.pth (finetune/train.py)",
    "finetune_checkpoint": "a fine-tuning run's checkpoint.pth",
    "published_finetuned": "released fine-tuned checkpoint of TransReID / PASS-reID, DPM, TSD, DPEFormer or BPBReID "
                           "(needs its config file)",
    "backbone_export": "passreid backbone export (pretrain backbone.pth / backbone_final.pth, convert_checkpoint.py)",
    "pretrain_checkpoint": "PASS / DINO pre-training checkpoint.pth (published or passreid)",
    "backbone_state_dict": "bare ViT state dict (converted DINO / timm layout)",
}
BACKBONE_FEATURES = ("pass_fusion", "cls")
_EXPECTED = "; ".join(f"{kind}: {text}" for kind, text in WEIGHT_KINDS.items())


class WeightsKindError(CheckpointFormatError):
    """The file is not a model passreid can use (or needs a config it was not given)."""


# ----------------------------------------------------------------------------- recognising files


def identify_weights(obj: Any, label: str = "the checkpoint") -> str:
    """The :data:`WEIGHT_KINDS` key of a loaded checkpoint object; raises :class:`WeightsKindError` naming
    ``label`` (the file) for anything else."""
    if not isinstance(obj, Mapping):
        raise WeightsKindError(f"{label} holds a {type(obj).__name__}, not a checkpoint dict; expected one of: "
                               f"{_EXPECTED}")
    from passreid.finetune.published_checkpoints import published_layout

    meta = obj.get("meta")
    if isinstance(meta, Mapping) and meta.get("format") == FINAL_FORMAT:
        return "finetuned"
    pretraining = pretraining_file_kind(obj)
    if pretraining is not None:
        return pretraining
    inner = wrapped_state(obj)
    if isinstance(obj.get("config"), Mapping) and "iteration" in obj and inner is not None:
        return "finetune_checkpoint"
    state = inner if inner is not None else obj
    if published_layout(state) is not None:
        return "published_finetuned"
    keys = [str(k)[len("module."):] if str(k).startswith("module.") else str(k) for k in state]
    if "cls_token" in keys and "patch_embed.proj.weight" in keys:
        return "backbone_state_dict"
    shown = ", ".join(sorted(map(str, obj))[:8])
    raise WeightsKindError(f"{label} is not a model file passreid recognises (top-level keys: {shown}); expected "
                           f"one of: {_EXPECTED}")


# ----------------------------------------------------------------------------- the loaded model


class FeatureNet(nn.Module):
    """``forward(images, camids=None) -> (B, D)`` test features of normalised images (ONNX / torch.hub).

    ``mode``: ``"eval_forward"`` (a fine-tuned model's eval forward, ``camids=`` passed when the model
    uses SIE), ``"pass_fusion"`` (backbone: cat(CLS, mean(parts)), [CLS] without parts) or ``"cls"``.
    """

    def __init__(self, network: nn.Module, mode: str, uses_cameras: bool = False) -> None:
        super().__init__()
        if mode not in ("eval_forward", *BACKBONE_FEATURES):
            raise ValueError(f"feature mode must be eval_forward, pass_fusion or cls, got {mode!r}")
        self.network = network
        self.mode = mode
        self.uses_cameras = uses_cameras

    def forward(self, images: Tensor, camids: Tensor | None = None) -> Tensor:
        if self.mode == "eval_forward":
            if self.uses_cameras:
                if camids is None:
                    raise ValueError("this model uses SIE camera embeddings: pass camids (0-based camera ids "
                                     "of the training cameras) with the images")
                return self.network(images, camids=camids)
            return self.network(images)
        tokens = self.network(images)
        if self.mode == "cls" or tokens.shape[1] == 1:
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode) and everything needed to feed it.

    ``network`` is the model as built (a fine-tuning method's model, or the :class:`VisionTransformer`
    of a backbone file); ``net`` wraps it into the test-feature function; ``config`` is the fine-tuning
    config (``None`` for backbones); ``report`` the key mapping of a published checkpoint.
    """

    net: FeatureNet
    kind: str
    source: str
    img_size: tuple[int, int]
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    config: Any = None
    report: LoadReport | None = None
    test_interpolation: str = "bilinear"  # the config's data.test_interpolation (bicubic for USL/UDA models)

    @property
    def network(self) -> nn.Module:
        return self.net.network

    @property
    def method(self) -> str | None:
        """The fine-tuning method (``None`` for backbones)."""
        return getattr(self.config, "method", None)

    @property
    def backbone(self) -> VisionTransformer | None:
        """The ViT inside the model (for attention maps), ``None`` when there is none."""
        if isinstance(self.network, VisionTransformer):
            return self.network
        backbone = getattr(self.network, "backbone", None)
        return backbone if isinstance(backbone, VisionTransformer) else None

    @property
    def uses_cameras(self) -> bool:
        """True for SIE models: their features need the images' camera ids."""
        return self.net.uses_cameras

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def describe(self) -> str:
        """One line: kind, source, input size, feature."""
        feature = {"eval_forward": f"eval forward of method {self.method!r}", "pass_fusion":
                   "PASS fusion cat(CLS, mean(parts))", "cls": "[CLS]"}[self.net.mode]
        return (f"{self.kind} model from {self.source}: input {self.img_size[0]}x{self.img_size[1]}, "
                f"feature = {feature}{', needs camera ids (SIE)' if self.uses_cameras else ''}")

    def to(self, device: torch.device | str) -> LoadedModel:
        self.net.to(device)
        return self

    def test_transform(self) -> Callable[[Image.Image], Tensor]:
        """PIL image -> normalised model input, exactly the evaluation pipeline's."""
        return build_test_transform(self.img_size, mean=self.pixel_mean, std=self.pixel_std,
                                    interpolation=self.test_interpolation)

    def prepare(self, inputs: Any) -> Tensor:
        """Images (anything :class:`FeatureExtractor` accepts) -> a batch of normalised inputs on the CPU."""
        dataset = _ImageSources(_as_sources(inputs), self.img_size, self.pixel_mean, self.pixel_std,
                                self.test_interpolation)
        return torch.stack([dataset[i] for i in range(len(dataset))])

    @torch.no_grad()
    def features(self, images: Tensor, camids: Tensor | None = None) -> Tensor:
        """Test features ``(B, D)`` of a batch of normalised images (on the model's device)."""
        self.net.eval()
        camids = camids.to(images.device) if camids is not None else None
        return self.net(images, camids)

    def test_distance(self, query: ExtractedFeatures, gallery: ExtractedFeatures,
                      device: torch.device | str | None = None) -> DistanceChunkFn:
        """Query-chunked distance ``fn(q0, q1) -> (q1 - q0, G)`` between two feature sets.

        A fine-tuning method's own test distance (``FinetuneMethod.build_test_distance``) when it has
        one, otherwise the configured ``eval.metric`` on L2-normalised features (unless ``eval.feat_norm`` is
        false; squared Euclidean for backbones), exactly as the evaluation does.
        """
        if self.config is not None:
            from passreid.finetune import get_method

            builder = get_method(self.config.method).build_test_distance
            if builder is not None:
                return builder(self.config, query, gallery, torch.device(device) if device else None)
            metric, normalize = self.config.eval.metric, self.config.eval.feat_norm
        else:
            metric, normalize = "euclidean", True
        return FeatureDistance(query.feats, gallery.feats, metric=metric, normalize=normalize, device=device)


def _finetuned(obj: Mapping[str, Any], kind: str, label: str, config: Any, allow_missing: Sequence[str],
               allow_unexpected: Sequence[str]) -> LoadedModel:
    from passreid.finetune import load_finetuned_model

    model, cfg, report = load_finetuned_model(obj, config, allow_missing=allow_missing,
                                              allow_unexpected=allow_unexpected, label=label)
    uses_cameras = getattr(model, "sie_embed", None) is not None
    return LoadedModel(FeatureNet(model, "eval_forward", uses_cameras).eval(), kind, label,
                       tuple(cfg.model.img_size), tuple(cfg.data.pixel_mean), tuple(cfg.data.pixel_std),
                       config=cfg, report=report, test_interpolation=cfg.data.test_interpolation)


def _backbone(obj: Mapping[str, Any], kind: str, label: str, which: str, feature: str,
              hw_ratio: int) -> LoadedModel:
    if feature not in BACKBONE_FEATURES:
        raise ValueError(f"backbone_feature must be one of {BACKBONE_FEATURES}, got {feature!r}")
    if kind == "backbone_export":
        try:
            settings = dict(arch=obj["arch"], img_size=tuple(obj["img_size"]), patch_size=int(obj["patch_size"]),
                            stride_size=int(obj["stride_size"]), num_part_tokens=int(obj["num_part_tokens"]))
        except (KeyError, TypeError, ValueError) as error:
            raise WeightsKindError(f"{label}: backbone export without valid arch/img_size/patch_size/stride_size/"
                                   f"num_part_tokens fields ({error!r})") from error
        source: Mapping[str, Any] = obj
    else:
        if kind == "pretrain_checkpoint" and is_meta_arch_state(wrapped_state(obj)):
            from passreid.pretrain.meta_arch import to_published_layout

            obj = {**obj, **to_published_layout(wrapped_state(obj))}
            obj.pop("model", None)
        try:
            state, _ = extract_backbone_state_dict(obj, which=which)
            settings = infer_vit_arguments(state, architecture_hints(obj), hw_ratio)
        except (ArchitectureError, CheckpointFormatError) as error:
            raise WeightsKindError(f"{label}: {error}") from error
        source = state
    arch = settings.pop("arch")
    if arch not in VIT_ARCHS:
        raise WeightsKindError(f"{label}: unknown ViT arch {arch!r}; expected one of {sorted(VIT_ARCHS)}")
    vit = build_vit(arch, **settings)
    report = load_pretrained(vit, source, which=which, hw_ratio=hw_ratio, label=label)  # strict: any difference raises
    return LoadedModel(FeatureNet(vit, feature).eval(), kind, label, tuple(settings["img_size"]),
                       IMAGENET_MEAN, IMAGENET_STD, report=report)


def load_model(
    weights: str | os.PathLike | Mapping[str, Any],
    config: Any = None,
    *,
    which: str = "teacher",
    backbone_feature: str = "pass_fusion",
    hw_ratio: int = 2,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    device: torch.device | str | None = None,
) -> LoadedModel:
    """Load any supported weights file (module docstring) into an eval-mode :class:`LoadedModel`.

    ``config``: a :class:`~passreid.finetune.FinetuneConfig` or a YAML path; needed only for released
    fine-tuned checkpoints (TransReID / PASS-reID, DPM, TSD, DPEFormer, BPBReID: it describes their
    architecture). ``which`` picks the ``teacher`` (default) or ``student`` of a pre-training checkpoint;
    ``hw_ratio`` is the height/width ratio used to infer the input size of a pre-training checkpoint that
    records none.
    ``device``: ``None`` = CUDA when available. Raises ``FileNotFoundError`` for a missing file and
    :class:`WeightsKindError` for a file of another kind.
    """
    if isinstance(weights, (str, os.PathLike)):
        label = str(weights)
        path = Path(weights).expanduser()
        if path.is_dir():
            raise WeightsKindError(f"{label} is a folder; pass the weights file in it (e.g. model_final.pth or "
                                   "backbone_final.pth)")
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {label}")
        obj = read_checkpoint(path)
    else:
        label, obj = "<in-memory checkpoint>", weights
    kind = identify_weights(obj, label)
    if isinstance(config, (str, os.PathLike)):
        from passreid.config import load_config
        from passreid.finetune import FinetuneConfig

        config = load_config(FinetuneConfig, config)
    if kind == "published_finetuned" and config is None:
        raise WeightsKindError(f"{label} is a {WEIGHT_KINDS[kind]}: pass the fine-tuning config file that "
                               "describes its architecture (config= / --config-file)")
    if kind in ("finetuned", "finetune_checkpoint", "published_finetuned"):
        loaded = _finetuned(obj, kind, label, config, allow_missing, allow_unexpected)
    else:
        loaded = _backbone(obj, kind, label, which, backbone_feature, hw_ratio)
    device = resolve_device(device)
    logger.info(loaded.describe())
    return loaded.to(device)


# ----------------------------------------------------------------------------- inputs


def list_images(spec: str | os.PathLike) -> list[str]:
    """Image paths named by ``spec``: an image file, a folder (its images, sorted; sub-folders are not
    searched) or a glob pattern (``**`` recursive). Raises ``FileNotFoundError`` when nothing matches."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        images, others = list_image_files(path)
        if others:  # a warning: the command-line tools show warnings, and nothing is left out unsaid
            names = [os.path.basename(other) for other in others]
            shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
            logger.warning("%s: ignored %d entr%s without an image extension (%s): %s (sub-folders are not "
                           "searched; use a glob such as '%s/**/*.jpg')", path, len(others),
                           "y" if len(others) == 1 else "ies", " ".join(IMAGE_EXTENSIONS), shown, path)
        if not images:
            raise FileNotFoundError(f"no images ({', '.join(('.jpg', '.png', '...'))}) in folder {path}")
        return images
    if path.is_file():
        return [str(path)]
    if glob.has_magic(text):
        matches = sorted(p for p in glob.glob(os.path.expanduser(text), recursive=True)
                         if os.path.isfile(p) and is_image_file(p))
        if not matches:
            raise FileNotFoundError(f"no image files match the pattern {text!r}")
        return matches
    raise FileNotFoundError(f"image, folder or glob pattern not found: {text}")


def parse_market_names(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(pids, camids)`` (camids 0-based) when every file name follows Market-1501 / DukeMTMC naming
    ``<pid>_c<camera>...``, else ``None`` (pid -1 = junk is kept: the file is there)."""
    pids, camids = [], []
    for path in paths:
        parsed = parse_market_name(os.path.basename(path))
        if parsed is None or parsed[1] < 1:
            return None
        pids.append(parsed[0])
        camids.append(parsed[1] - 1)
    if not pids:
        return None
    return np.asarray(pids, dtype=np.int64), np.asarray(camids, dtype=np.int64)


def _as_sources(inputs: Any) -> list[Any]:
    """A flat list of image sources: paths (folders / globs expanded), PIL images, HWC arrays, CHW tensors."""
    if isinstance(inputs, (str, os.PathLike)):
        return list(list_images(inputs))
    if isinstance(inputs, Image.Image):
        return [inputs]
    if isinstance(inputs, np.ndarray):
        if inputs.ndim == 4:
            return list(inputs)
        return [inputs]
    if isinstance(inputs, Tensor):
        if inputs.ndim == 4:
            return list(inputs)
        return [inputs]
    if isinstance(inputs, Iterable):
        sources: list[Any] = []
        for item in inputs:
            if isinstance(item, (str, os.PathLike)):
                sources += list_images(item)
            elif isinstance(item, (Image.Image, np.ndarray, Tensor)):
                sources += _as_sources(item) if getattr(item, "ndim", 3) == 4 else [item]
            else:
                raise TypeError(f"unsupported image input {type(item).__name__}; expected a path, folder, glob, "
                                "PIL image, numpy array (H, W, 3) or tensor (3, H, W)")
        return sources
    raise TypeError(f"unsupported image input {type(inputs).__name__}; expected a path, folder, glob, PIL image, "
                    "numpy array, tensor or a list of them")


class _ImageSources(Dataset):
    """Image sources -> normalised model inputs with the model's test transform."""

    def __init__(self, sources: list[Any], img_size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear"):
        self.sources = sources
        self.img_size = img_size
        self.interpolation = interpolation
        self.transform = build_test_transform(img_size, mean=mean, std=std, interpolation=interpolation)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.sources)

    def _from_tensor(self, tensor: Tensor, position: int) -> Tensor:
        """A ToTensor-style image (float in [0, 1], or uint8) (3, H, W) resized and normalised."""
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
            raise ValueError(f"image {position}: expected a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
        tensor = tensor.float() / 255.0 if not tensor.is_floating_point() else tensor.float()
        tensor = tensor.expand(3, -1, -1)
        resized = torch.nn.functional.interpolate(tensor[None], size=self.img_size, mode=self.interpolation,
                                                  align_corners=False, antialias=True)[0]
        return (resized - self.mean) / self.std

    def __getitem__(self, index: int) -> Tensor:
        source = self.sources[index]
        if isinstance(source, (str, os.PathLike)):
            return self.transform(read_image(source))
        if isinstance(source, Image.Image):
            return self.transform(source.convert("RGB"))
        if isinstance(source, np.ndarray):
            if source.dtype == np.uint8 and source.ndim in (2, 3):
                return self.transform(Image.fromarray(source).convert("RGB"))
            if source.ndim != 3 or source.shape[2] not in (1, 3):
                raise ValueError(f"image {index}: expected an (H, W, 3) array, got shape {source.shape}")
            return self._from_tensor(torch.from_numpy(np.ascontiguousarray(source)).permute(2, 0, 1), index)
        return self._from_tensor(source.detach().cpu(), index)


class FeatureExtractor:
    """Test features of images, with a model's own test transform, batched, on the GPU when present.

    ``FeatureExtractor(weights, device=None)``; ``weights`` is anything :func:`load_model` reads (or an
    already :class:`LoadedModel`). Call it with an image path, a folder, a glob, a PIL image, a uint8
    ``(H, W, 3)`` RGB array, a float ``(3, H, W)`` RGB tensor in [0, 1] (``(N, ...)`` batches too) or a
    list of these; it returns the ``(N, D)`` float32 features on the CPU in input order. Paths and PIL
    images go through exactly the evaluation transform; arrays/tensors of another size are resized with
    an antialiased filter of the model's test interpolation (bilinear; bicubic for USL/UDA models), which
    may differ from PIL's by a little.

    SIE models need ``camids=`` (0-based training camera ids), one per image. A call longer than
    ``log_interval_s`` logs its progress (``features: batch i/n (k images)  r images/s  eta h:mm:ss``, logger
    ``passreid.inference.progress``; the command-line tools print it) at most that often, and its totals at
    the end.
    """

    def __init__(self, weights: str | os.PathLike | LoadedModel, device: torch.device | str | None = None, *,
                 config: Any = None, batch_size: int = 64, num_workers: int = 0, log_interval_s: float = 30.0,
                 **load_options: Any) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(weights, LoadedModel):
            self.model = weights.to(device) if device is not None else weights
        else:
            self.model = load_model(weights, config, device=device, **load_options)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.log_interval_s = log_interval_s

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(self, inputs: Any, camids: Sequence[int] | np.ndarray | Tensor | None = None) -> Tensor:
        sources = _as_sources(inputs)
        if not sources:
            raise ValueError("no images given")
        camera_ids = None
        if camids is not None:
            camera_ids = torch.as_tensor(np.asarray(camids), dtype=torch.long)
            if camera_ids.shape != (len(sources),):
                raise ValueError(f"camids has {tuple(camera_ids.shape)} entries for {len(sources)} images")
        elif self.model.uses_cameras:
            raise ValueError(f"{self.model.source} uses SIE camera embeddings: pass camids= (one 0-based camera id "
                             "per image)")
        m = self.model
        loader = DataLoader(_ImageSources(sources, m.img_size, m.pixel_mean, m.pixel_std, m.test_interpolation),
                            batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda")
        progress = ThroughputLogger("features", len(loader), progress_logger, interval_s=self.log_interval_s)
        feats, start = [], 0
        for images in loader:
            batch_camids = camera_ids[start:start + len(images)] if camera_ids is not None else None
            feats.append(m.features(images.to(self.device, non_blocking=True), batch_camids).float().cpu())
            start += len(images)
            progress.update(len(images))
        progress.finish()
        return torch.cat(feats)


def extracted(feats: Tensor | np.ndarray, pids: np.ndarray | None = None,
              camids: np.ndarray | None = None) -> ExtractedFeatures:
    """Wrap features as :class:`ExtractedFeatures` (unknown identities / cameras = -1) for distances."""
    feats = feats.numpy() if isinstance(feats, Tensor) else np.asarray(feats)
    count = len(feats)
    unknown = np.full(count, -1, dtype=np.int64)
    return ExtractedFeatures(feats.astype(np.float32), unknown if pids is None else np.asarray(pids, np.int64),
                             unknown.copy() if camids is None else np.asarray(camids, np.int64))



# ----------------------------------------------------------------------------- command-line tools

#: What the model tools report as bad input besides :func:`passreid.cli.user_errors` (their own option checks
#: raise ValueError), as ``<tool>: error: <message>`` with exit status 2: ``@error_boundary(extra=CLI_ERRORS)``.
CLI_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--weights``, ``--config-file``, ``--which``, ``--backbone-feature``, ``--device``, ``--batch-size``."""
    parser.add_argument("--weights", required=True, metavar="FILE",
                        help="model_final.pth, a backbone export (backbone_final.pth), a PASS/DINO checkpoint.pth, "
                             "or a published TransReID/PASS fine-tuned checkpoint (with --config-file)")
    parser.add_argument("--config-file", default=None, metavar="YAML",
                        help="fine-tuning config describing a published TransReID/PASS checkpoint's architecture")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher",
                        help="network of a pre-training checkpoint (default: teacher)")
    parser.add_argument("--backbone-feature", choices=BACKBONE_FEATURES, default="pass_fusion",
                        help="feature of a backbone file: cat(CLS, mean(parts)) (default) or CLS")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="image decoding worker processes")


def show_progress() -> None:
    """Print :class:`FeatureExtractor`'s progress lines on stderr (once per process: the tools call it)."""
    if not any(isinstance(handler, ConsoleHandler) for handler in progress_logger.handlers):
        progress_logger.addHandler(ConsoleHandler("stderr"))
        progress_logger.setLevel(logging.INFO)


def load_model_from_args(args: argparse.Namespace) -> FeatureExtractor:
    """The :class:`FeatureExtractor` described by :func:`add_model_arguments`' options; a long extraction
    prints its progress on stderr (:func:`show_progress`)."""
    show_progress()
    resolve_device(args.device)  # a bad --device is one message before the weights are read
    return FeatureExtractor(args.weights, args.device, config=args.config_file, batch_size=args.batch_size,
                            num_workers=args.num_workers, which=args.which, backbone_feature=args.backbone_feature)
