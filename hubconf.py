"""torch.hub entry points for passreid models. Weights are LOCAL files: nothing is downloaded.

    import torch
    extractor = torch.hub.load("/path/to/passreid", "feature_extractor", source="local",
                               weights="runs/market/model_final.pth")
    feats = extractor("my_images/")                       # (N, D) features

    net = torch.hub.load("/path/to/passreid", "passreid_model", source="local", weights="model_final.pth")
    vit = torch.hub.load("/path/to/passreid", "pass_vit_small", source="local", weights="pass_vit_s_lup.pth")

``weights`` is any file ``passreid.load_model`` reads: a fine-tuned ``model_final.pth``, a pre-training
backbone export, a PASS / DINO ``checkpoint.pth``, or a published TransReID / PASS fine-tuned checkpoint
(pass ``config=`` with the fine-tuning YAML that describes it). The repository's ``src/`` is used when
passreid is not installed (its dependencies, listed below, must be).
"""
from __future__ import annotations

import sys
from pathlib import Path

dependencies = ["torch", "torchvision", "timm", "numpy", "PIL", "yaml"]

try:
    import passreid  # noqa: F401
except ImportError:  # a hub checkout that is not pip-installed: use its src/ layout
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))


def feature_extractor(weights: str, device: str | None = None, config: str | None = None, **options):
    """A :class:`passreid.inference.FeatureExtractor`: call it on image paths, folders, PIL images, arrays or
    tensors to get ``(N, D)`` test features (the model's own transform, batched, GPU when present)."""
    from passreid.inference import FeatureExtractor

    return FeatureExtractor(weights, device, config=config, **options)


def passreid_model(weights: str, device: str | None = None, config: str | None = None, **options):
    """The test-feature network (``nn.Module``, eval mode): ``net(images[, camids]) -> (B, D)`` for images
    already resized to ``net.img_size`` and normalised with ``net.pixel_mean`` / ``net.pixel_std``."""
    from passreid.inference import load_model

    loaded = load_model(weights, config, device=device, **options)
    net = loaded.net
    net.img_size, net.pixel_mean, net.pixel_std = loaded.img_size, loaded.pixel_mean, loaded.pixel_std
    return net


def _backbone(arch: str, weights: str, which: str, device: str | None):
    from passreid.inference import WeightsKindError, load_model

    loaded = load_model(weights, which=which, device=device)
    if loaded.config is not None:
        raise WeightsKindError(f"{weights} is a fine-tuned model; {arch} expects a pre-training checkpoint or a "
                               "backbone export (use passreid_model for fine-tuned models)")
    vit = loaded.network
    from passreid.models import VIT_ARCHS

    spec = VIT_ARCHS[arch]
    if (vit.embed_dim, vit.depth) != (spec.embed_dim, spec.depth):
        raise WeightsKindError(f"{weights} holds a ViT with embed_dim {vit.embed_dim} and depth {vit.depth}, not "
                               f"{arch} ({spec.embed_dim}, {spec.depth})")
    return vit


def pass_vit_small(weights: str, which: str = "teacher", device: str | None = None):
    """PASS / DINO ViT-S/16 backbone (``passreid.models.VisionTransformer``, eval mode) from a local
    pre-training checkpoint or backbone export; ``vit(images)`` -> (B, 1 + parts, 384) leading tokens."""
    return _backbone("vit_small", weights, which, device)


def pass_vit_base(weights: str, which: str = "teacher", device: str | None = None):
    """PASS / DINO ViT-B/16 backbone from a local pre-training checkpoint or backbone export."""
    return _backbone("vit_base", weights, which, device)
