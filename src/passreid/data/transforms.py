"""Re-ID image transforms: the TransReID-family training pipeline and the test pipeline.

Training (PASS / TransReID / TransReID-SSL / Cluster-Contrast): bicubic resize, horizontal flip, zero
padding, random crop back to size, to-tensor, normalise, then random erasing (applied after normalisation)
in one of two published forms (``ERASING_MODES``):

* ``"pixel"``: timm's ``RandomErasing(mode='pixel')`` as TransReID uses it: area 0.02-1/3, log-uniform
  aspect 0.3-1/0.3, 10 attempts, i.i.d. N(0, 1) fill (the normalised value range);
* ``"cluster_contrast"``: Cluster-Contrast's own ``RandomErasing`` (PASS-reID,
  PASS_cluster_contrast_reid/clustercontrast/utils/data/transforms.py, called from
  examples/cluster_contrast_train_usl.py; the same class in alibaba/cluster-contrast-reid): area 0.02-0.4,
  *uniform* aspect 0.3-1/0.3, 100 attempts, the constant fill (0.485, 0.456, 0.406) per channel written
  into the normalised tensor (also with mean/std 0.5).

Test: resize (bilinear as TransReID's ``T.Resize`` default, or bicubic as Cluster-Contrast's test and
clustering loader, ``TEST_INTERPOLATIONS``) -> to-tensor -> normalise. All randomness comes from torch's
global generator, so ``torch.manual_seed`` (or a DataLoader worker seed) makes a pipeline reproducible.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

HALF = (0.5, 0.5, 0.5)

#: The published Cluster-Contrast erasing fill (the ImageNet mean, used as is after normalisation).
CLUSTER_CONTRAST_FILL = (0.485, 0.456, 0.406)
ERASING_MODES = ("pixel", "cluster_contrast")
TEST_INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"size must be (height, width) with positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


class RandomErasing:
    """Erase one random rectangle of a normalised (C, H, W) tensor (timm 'pixel' mode by default).

    With probability ``probability``: up to ``max_attempts`` times draw a target area uniformly in
    ``[min_area, max_area] * H * W`` and an aspect ratio (h / w) in ``[min_aspect, max_aspect]``
    (``max_aspect`` defaults to ``1 / min_aspect``), log-uniform (``aspect_sampling="log_uniform"``, timm)
    or uniform (``"uniform"``, Zhong et al. / Cluster-Contrast); ``h = round(sqrt(area * aspect))``,
    ``w = round(sqrt(area / aspect))``; the first box with ``h < H`` and ``w < W`` is placed uniformly and
    filled with i.i.d. N(0, 1) noise (``fill="pixel"``) or one constant per channel (``fill`` a tuple).
    If no attempt fits, the image is unchanged. The input tensor is not modified. Draw order (torch's
    global generator): the probability, then per attempt the area and the aspect, then top and left.
    A box must also be non-empty (``0 < h``, ``0 < w``); that only matters below 42 pixels per image.
    """

    def __init__(self, probability: float = 0.5, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, max_aspect: float | None = None, max_attempts: int = 10,
                 aspect_sampling: str = "log_uniform", fill: str | Sequence[float] = "pixel"):
        _check_probability("RandomErasing probability", probability)
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not 0.0 < min_area <= max_area <= 1.0:
            raise ValueError(f"RandomErasing needs 0 < min_area <= max_area <= 1, got {min_area}, {max_area}")
        if not 0.0 < min_aspect <= max_aspect:
            raise ValueError(f"RandomErasing needs 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        if max_attempts < 1:
            raise ValueError(f"RandomErasing max_attempts must be >= 1, got {max_attempts}")
        if aspect_sampling not in ("log_uniform", "uniform"):
            raise ValueError(f"RandomErasing aspect_sampling must be 'log_uniform' or 'uniform', "
                             f"got {aspect_sampling!r}")
        if isinstance(fill, str) and fill != "pixel":
            raise ValueError(f"RandomErasing fill must be 'pixel' or one value per channel, got {fill!r}")
        self.probability = probability
        self.min_area, self.max_area = min_area, max_area
        self.min_aspect, self.max_aspect = min_aspect, max_aspect
        self.aspect_sampling = aspect_sampling
        self.max_attempts = max_attempts
        self.fill = fill if isinstance(fill, str) else tuple(float(v) for v in fill)

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand(()).item()

    def _aspect(self) -> float:
        if self.aspect_sampling == "uniform":
            return self._uniform(self.min_aspect, self.max_aspect)
        return math.exp(self._uniform(math.log(self.min_aspect), math.log(self.max_aspect)))

    def sample_box(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """Draw ``(top, left, h, w)`` for an image of this size, or ``None`` (skipped by chance or no fit)."""
        if torch.rand(()).item() >= self.probability:
            return None
        area = height * width
        for _ in range(self.max_attempts):
            target_area = self._uniform(self.min_area, self.max_area) * area
            aspect = self._aspect()
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
        if self.fill != "pixel" and len(self.fill) != tensor.shape[0]:
            raise ValueError(f"RandomErasing fill has {len(self.fill)} values for a {tensor.shape[0]}-channel image")
        box = self.sample_box(tensor.shape[1], tensor.shape[2])
        if box is None:
            return tensor
        top, left, h, w = box
        erased = tensor.clone()
        if self.fill == "pixel":
            erased[:, top:top + h, left:left + w] = torch.randn((tensor.shape[0], h, w), dtype=tensor.dtype)
        else:
            erased[:, top:top + h, left:left + w] = torch.tensor(self.fill, dtype=tensor.dtype).view(-1, 1, 1)
        return erased

    def __repr__(self) -> str:
        fill = repr(self.fill) if self.fill != "pixel" else "'pixel'"
        return (f"{type(self).__name__}(probability={self.probability}, area=({self.min_area}, {self.max_area:.4f}), "
                f"aspect=({self.min_aspect:.2f}, {self.max_aspect:.2f}, {self.aspect_sampling}), "
                f"max_attempts={self.max_attempts}, fill={fill})")


def build_random_erasing(mode: str, probability: float) -> RandomErasing:
    """The published random erasing named by ``mode`` (``ERASING_MODES``, module docstring)."""
    if mode == "pixel":
        return RandomErasing(probability)
    if mode == "cluster_contrast":
        return RandomErasing(probability, min_area=0.02, max_area=0.4, min_aspect=0.3, max_attempts=100,
                             aspect_sampling="uniform", fill=CLUSTER_CONTRAST_FILL)
    raise ValueError(f"random erasing mode must be one of {ERASING_MODES}, got {mode!r}")


def build_train_transform(size: Sequence[int] = (256, 128), flip_p: float = 0.5, padding: int = 10,
                          erasing_p: float = 0.5, mean: Sequence[float] = HALF,
                          std: Sequence[float] = HALF, erasing: str = "pixel") -> Callable:
    """TransReID-family training pipeline for PIL images -> normalised float tensor (3, H, W).

    Resize (bicubic) -> RandomHorizontalFlip(flip_p) -> Pad(padding, 0) -> RandomCrop(size) -> ToTensor ->
    Normalize(mean, std) -> random erasing (``erasing``: ``"pixel"`` or ``"cluster_contrast"``, p ``erasing_p``).
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
        build_random_erasing(erasing, erasing_p),
    ])


def build_test_transform(size: Sequence[int] = (256, 128), mean: Sequence[float] = HALF,
                         std: Sequence[float] = HALF, interpolation: str = "bilinear") -> Callable:
    """Test pipeline for PIL images: Resize (``interpolation``: ``"bilinear"`` or ``"bicubic"``) -> ToTensor ->
    Normalize(mean, std)."""
    height, width = _check_size(size)
    if interpolation not in TEST_INTERPOLATIONS:
        raise ValueError(f"test interpolation must be one of {sorted(TEST_INTERPOLATIONS)}, got {interpolation!r}")
    return T.Compose([
        T.Resize((height, width), interpolation=TEST_INTERPOLATIONS[interpolation]),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
