"""CNN feature-map backbones of BPBReID (Somers et al., WACV'23): HRNet-W32 and ResNet-50, built with timm.

Both return a spatial feature map ``(N, C, h, w)`` for the part-attention head, as the published bpbreid code
takes it (VlSomers/bpbreid, torchreid/models/hrnet.py and torchreid/models/resnet.py):

* ``hrnet_w32``: the four branches of HRNet-W32's last stage (strides 4, 8, 16, 32), each through its
  channel-increase module (a Bottleneck: 32/64/128/256 -> 128/256/512/1024 channels), the three coarser ones
  upsampled bilinearly (``align_corners=True``) to the stride-4 grid and concatenated: 1920 channels at stride
  4, e.g. 96 x 32 for 384 x 128 input. The classification head (``downsamp_modules``, ``final_layer``,
  ``classifier``) is not built.
* ``resnet50``: the output of ``layer4`` with its stride set to 1 (bpbreid's ``last_stride: 1``, a plain
  stride change, no dilation): 2048 channels at stride 16, e.g. 24 x 8 for 384 x 128 input.

The modules are timm's own classes (``pretrained=False``: nothing is ever downloaded), so their state-dict keys
are those of the ImageNet checkpoints the published code loads (HRNet-Image-Classification's
``hrnetv2_w32_imagenet_pretrained.pth``, torchvision's ``resnet50-19c8e357.pth``). ``imagenet_head_keys`` names
the classification-head entries of those files, which a feature extractor does not use;
``optional_weight_keys`` the BatchNorm step counters (``num_batches_tracked``) that files written by old torch
versions lack (they only matter for BatchNorm with ``momentum=None``).

ResNet-50-IBN (the paper's third backbone) is not offered: timm has no IBN-Net model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.hrnet import HighResolutionNetFeatures, cfg_cls
from timm.models.resnet import Bottleneck, ResNet
from torch import Tensor, nn

__all__ = ["CNN_ARCHS", "HRNetW32FeatureMap", "ResNet50FeatureMap", "build_cnn_backbone", "is_cnn_arch"]


_BN_COUNTERS = ("*.num_batches_tracked",)


class HRNetW32FeatureMap(HighResolutionNetFeatures):
    """HRNet-W32 whose forward is the 1920-channel stride-4 map (module docstring)."""

    out_channels = 1920
    stride = 4
    imagenet_head_keys = ("downsamp_modules.*", "final_layer.*", "classifier.*")
    optional_weight_keys = _BN_COUNTERS

    def __init__(self) -> None:
        super().__init__(cfg_cls["hrnet_w32"], feature_location="incre", out_indices=(1, 2, 3, 4))

    def forward(self, images: Tensor) -> Tensor:  # type: ignore[override]
        finest, *coarser = super().forward(images)
        size = finest.shape[2:]
        upsampled = [F.interpolate(f, size=size, mode="bilinear", align_corners=True) for f in coarser]
        return torch.cat([finest, *upsampled], dim=1)


class ResNet50FeatureMap(ResNet):
    """ResNet-50 whose forward is ``layer4``'s map with last stride 1 (module docstring)."""

    out_channels = 2048
    stride = 16
    imagenet_head_keys = ("fc.*",)
    optional_weight_keys = _BN_COUNTERS

    def __init__(self) -> None:
        super().__init__(block=Bottleneck, layers=(3, 4, 6, 3), num_classes=0, global_pool="")
        first = self.layer4[0]
        first.conv2.stride = (1, 1)
        first.downsample[0].stride = (1, 1)

    def forward(self, images: Tensor) -> Tensor:  # type: ignore[override]
        return self.forward_features(images)


CNN_ARCHS: dict[str, type[nn.Module]] = {"hrnet_w32": HRNetW32FeatureMap, "resnet50": ResNet50FeatureMap}


def is_cnn_arch(arch: str) -> bool:
    """Whether ``arch`` (``model.arch``) names a CNN feature-map backbone rather than a ViT."""
    return arch in CNN_ARCHS


def build_cnn_backbone(arch: str) -> nn.Module:
    """A randomly initialised feature-map backbone ``arch`` (``out_channels``, ``stride``, ``imagenet_head_keys``)."""
    if arch not in CNN_ARCHS:
        raise ValueError(f"unknown CNN backbone {arch!r}; available: {', '.join(sorted(CNN_ARCHS))}")
    return CNN_ARCHS[arch]()
