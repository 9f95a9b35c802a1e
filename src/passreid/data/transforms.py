"""Re-ID image transforms: the TransReID-family training pipeline and the test pipeline.

Training (PASS / TransReID / TransReID-SSL): bicubic resize, horizontal flip, zero padding, random crop back
to size, to-tensor, normalise, then random erasing in timm's ``mode='pixel'`` form (applied after
normalisation, so the N(0, 1) fill matches the normalised value range). All randomness comes from torch's
global generator, so ``torch.manual_seed`` (or a DataLoader worker seed) makes a pipeline reproducible.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

HALF = (0.5, 0.5, 0.5)


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"size must be (height, width) with positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


class RandomErasing:
    """Erase one random rectangle of a normalised (C, H, W) tensor with i.i.d. N(0, 1) noise (timm 'pixel' mode).

    With probability ``probability``: up to ``max_attempts`` times draw a target area uniformly in
    ``[min_area, max_area] * H * W`` and a log-uniform aspect ratio (h / w) in ``[min_aspect, max_aspect]``
    (``max_aspect`` defaults to ``1 / min_aspect``); ``h = round(sqrt(area * aspect))``,
    ``w = round(sqrt(area / aspect))``; the first box with ``h < H`` and ``w < W`` is placed uniformly and
    filled. If no attempt fits, the image is unchanged. The input tensor is not modified.
    """

    def __init__(self, probability: float = 0.5, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, max_aspect: float | None = None, max_attempts: int = 10):
        _check_probability("RandomErasing probability", probability)
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not 0.0 < min_area <= max_area <= 1.0:
            raise ValueError(f"RandomErasing needs 0 < min_area <= max_area <= 1, got {min_area}, {max_area}")
        if not 0.0 < min_aspect <= max_aspect:
            raise ValueError(f"RandomErasing needs 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        if max_attempts < 1:
            raise ValueError(f"RandomErasing max_attempts must be >= 1, got {max_attempts}")
        self.probability = probability
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = max_attempts

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand(()).item()

    def sample_box(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """Draw ``(top, left, h, w)`` for an image of this size, or ``None`` (skipped by chance or no fit)."""
        if torch.rand(()).item() >= self.probability:
            return None
        area = height * width
        for _ in range(self.max_attempts):
            target_area = self._uniform(self.min_area, self.max_area) * area
            aspect = math.exp(self._uniform(*self.log_aspect_range))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if 0 < h < height and 0 < w < width:
                top = int(torch.randint(0, height - h + 1, ()).item())
                left = int(torch.randint(0, width - w + 1, ()).item())
                return top, left, h, w
        return None

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() != 3:
            raise ValueError(f"RandomErasing expects a (C, H, W) tensor, got shape {tuple(tensor.shape)}")
        box = self.sample_box(tensor.shape[1], tensor.shape[2])
        if box is None:
            return tensor
        top, left, h, w = box
        erased = tensor.clone()
        erased[:, top:top + h, left:left + w] = torch.randn((tensor.shape[0], h, w), dtype=tensor.dtype)
        return erased

    def __repr__(self) -> str:
        low, high = (math.exp(v) for v in self.log_aspect_range)
        return (f"{type(self).__name__}(probability={self.probability}, area=({self.min_area}, {self.max_area:.4f}), "
                f"aspect=({low:.2f}, {high:.2f}), max_attempts={self.max_attempts}, fill='pixel')")


def build_train_transform(size: Sequence[int] = (256, 128), flip_p: float = 0.5, padding: int = 10,
                          erasing_p: float = 0.5, mean: Sequence[float] = HALF,
                          std: Sequence[float] = HALF) -> Callable:
    """TransReID-family training pipeline for PIL images -> normalised float tensor (3, H, W).

    Resize (bicubic) -> RandomHorizontalFlip(flip_p) -> Pad(padding, 0) -> RandomCrop(size) -> ToTensor ->
    Normalize(mean, std) -> RandomErasing(erasing_p).
    """
    height, width = _check_size(size)
    _check_probability("flip_p", flip_p)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    return T.Compose([
        T.Resize((height, width), interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(flip_p),
        T.Pad(padding, fill=0),
        T.RandomCrop((height, width)),
        T.ToTensor(),
        T.Normalize(mean, std),
        RandomErasing(erasing_p),
    ])


def build_test_transform(size: Sequence[int] = (256, 128), mean: Sequence[float] = HALF,
                         std: Sequence[float] = HALF) -> Callable:
    """Test pipeline for PIL images: Resize (bilinear) -> ToTensor -> Normalize(mean, std)."""
    height, width = _check_size(size)
    return T.Compose([
        T.Resize((height, width), interpolation=InterpolationMode.BILINEAR),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
