"""PASS multi-crop on the training device: the published augmentation, batched (``data.augment_on=gpu``).

The published pipeline (``MultiCropAugmentation``, PIL in the loader workers) costs a loader core
~25-35 ms per sample. Here the work is split in two:

* **worker side** (:class:`MultiCropParamSampler`, per sample, CPU): the decoded image as a uint8
  ``(H, W, 3)`` tensor at its own size, plus every random parameter of its 2 + n views, drawn by
  the *published transform objects' own draws in the published order* (torchvision's
  ``RandomResizedCrop.get_params`` on the image or its band, ``ColorJitter.get_params``, the flip /
  apply / grayscale / blur / solarise coin flips) from torch's global generator. Under the trainer's
  per-sample seeding (``seeded_global_rngs(sample_seed(seed, epoch, index))``) a sample therefore gets
  exactly the parameters the published pipeline would give it: same crop boxes, flips, jitter factors
  and order, blur radii; resume stays exact.
* **device side** (:class:`BatchedMultiCrop`, per batch, on ``images.device``): crops + bicubic
  resize, flip, colour jitter (per-sample factors and per-sample order), grayscale, Gaussian blur,
  solarisation and normalisation of the whole batch, returning the list of ``2 + n`` view batches
  the meta-architecture consumes (same order and shapes as the CPU path).

Hand-written torch (not kornia) because it reproduces the published PIL operations: the resize is
PIL's antialiased bicubic (a = -0.5, support widened when shrinking) written as two per-view weight
matrices (one batched matmul per axis, crops of any size from images of any size), the blur is PIL's
three-pass extended box blur (PIL's ``GaussianBlur`` is not a true Gaussian), grayscale uses PIL's
weights, and the jitter order is drawn per sample as torchvision does. What differs from PIL, measured
in ``tests/test_device_multicrop.py`` (levels of 0..255): PIL rounds to uint8 after every step and
truncates in ``Image.blend`` and in its 8-bit HSV (hue); here every step is float32. Per op the
difference is below one level on average, a few levels at most (hue: up to ~6 at saturated
pixels); end to end the views match the CPU path's to about a level on average. See
``pretrain/README.md`` (throughput, and why not kornia / DALI).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torchvision import transforms as T

from .multicrop import MultiCropAugmentation, RandomGaussianBlur, RandomSolarize, band_rows

__all__ = [
    "BatchedMultiCrop",
    "DeviceSample",
    "MultiCropParamSampler",
    "PARAM_KEYS",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "collate_device_samples",
    "color_jitter",
    "device_sample_views",
    "pil_bicubic_weights",
    "pil_gaussian_blur",
    "resized_crops",
]

# PIL's RGB -> L weights (ImagingConvert: L = (19595 R + 38470 G + 7471 B) >> 16), used by grayscale,
# contrast and saturation alike; torchvision's tensor path uses 0.2989 instead.
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# Per-view parameters a sample carries from the worker to the device (see MultiCropParamSampler).
PARAM_KEYS = ("box", "flip", "jitter_on", "jitter", "jitter_order", "gray", "blur_radius", "solarize")
_IDENTITY_JITTER = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue factors that change nothing


# ============================================================================ worker side


@dataclass
class _ViewRecipe:
    """The published transforms of one view, in the order they draw."""

    crop: T.RandomResizedCrop
    flip: T.RandomHorizontalFlip
    jitter: T.RandomApply
    gray: T.RandomGrayscale
    blur: RandomGaussianBlur
    solarize: RandomSolarize | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def color(self) -> T.ColorJitter:
        return self.jitter.transforms[0]


def _flatten(transform: Any) -> list[Any]:
    if isinstance(transform, T.Compose):
        return [step for inner in transform.transforms for step in _flatten(inner)]
    return [transform]


def _recipe(transform: Any, name: str) -> _ViewRecipe:
    """Read one view's published ``Compose``; anything but the published sequence is refused (the
    device side implements exactly that sequence)."""
    steps = _flatten(transform)
    kinds = [type(step) for step in steps]
    with_solarize = RandomSolarize in kinds
    expected = [T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandomApply, T.RandomGrayscale, RandomGaussianBlur,
                *([RandomSolarize] if with_solarize else []), T.ToTensor, T.Normalize]
    jitter = steps[2] if len(steps) > 2 else None
    if kinds != expected or not (isinstance(jitter, T.RandomApply) and len(jitter.transforms) == 1
                                 and isinstance(jitter.transforms[0], T.ColorJitter)):
        raise TypeError(f"device-side multi-crop: {name} is not the published sequence "
                        f"{[k.__name__ for k in expected]} (got {[k.__name__ for k in kinds]})")
    normalize = steps[-1]
    return _ViewRecipe(crop=steps[0], flip=steps[1], jitter=jitter, gray=steps[3], blur=steps[4],
                       solarize=steps[5] if with_solarize else None,
                       mean=tuple(normalize.mean), std=tuple(normalize.std))


def _draw_view(recipe: _ViewRecipe, source: Tensor, top_offset: int) -> dict[str, Any]:
    """One view's draws, in the order and with the calls of the published transforms' ``forward``
    (torchvision 0.16+: ``RandomApply`` draws before its transform, ``ColorJitter`` draws the order
    then the four factors). ``source`` is the (C, H, W) image or band the crop is taken from."""
    crop = recipe.crop
    top, left, height, width = crop.get_params(source, crop.scale, crop.ratio)
    flip = bool(torch.rand(1) < recipe.flip.p)
    jitter_on = not bool(recipe.jitter.p < torch.rand(1))
    order, factors = [0, 1, 2, 3], list(_IDENTITY_JITTER)
    if jitter_on:
        color = recipe.color
        fn_idx, *drawn = color.get_params(color.brightness, color.contrast, color.saturation, color.hue)
        order = fn_idx.tolist()
        factors = [identity if value is None else value for value, identity in zip(drawn, _IDENTITY_JITTER)]
    gray = bool(torch.rand(1) < recipe.gray.p)
    radius = recipe.blur.draw()
    solarize = recipe.solarize.draw() if recipe.solarize is not None else False
    return {"box": (top + top_offset, left, height, width), "flip": flip, "jitter_on": jitter_on,
            "jitter": factors, "jitter_order": order, "gray": gray,
            "blur_radius": 0.0 if radius is None else radius, "solarize": solarize}


@dataclass
class DeviceSample:
    """What a loader worker hands over for one image: the pixels and the drawn parameters."""

    image: Tensor  # uint8 (H, W, 3), the image at its own size
    params: dict[str, Tensor]  # PARAM_KEYS -> (num_views, ...) tensors


class MultiCropParamSampler:
    """PIL image -> :class:`DeviceSample` (worker side of ``data.augment_on=gpu``; module docstring).

    Draws from torch's global generator exactly what ``augmentation(image)`` would draw, in the same
    order, so under the same seed the parameters are the published pipeline's.
    """

    def __init__(self, augmentation: MultiCropAugmentation) -> None:
        self.augmentation = augmentation
        self.global_recipes = [_recipe(augmentation.global_transform1, "global_transform1"),
                               _recipe(augmentation.global_transform2, "global_transform2")]
        self.local_recipe = _recipe(augmentation.local_transform, "local_transform")

    def _local_sources(self, image: Tensor) -> list[tuple[Tensor, int]]:
        """(source, its top row in the image) of every local view, in output order."""
        aug = self.augmentation
        if aug.mode == "dino":
            return [(image, 0)] * aug.num_local
        return [(image[:, top:top + height], top) for top, height in band_rows(image.shape[1])
                for _ in range(aug.crops_per_band)]

    def __call__(self, image: Image.Image) -> DeviceSample:
        if not isinstance(image, Image.Image):
            raise TypeError(f"MultiCropParamSampler expects a PIL image (e.g. from passreid.data.read_image), "
                            f"got {type(image).__name__}")
        pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))  # (H, W, 3), a copy
        chw = pixels.permute(2, 0, 1)  # a view: get_params reads only the size
        views = [_draw_view(recipe, chw, 0) for recipe in self.global_recipes]
        views += [_draw_view(self.local_recipe, source, top) for source, top in self._local_sources(chw)]
        params = {
            "box": torch.tensor([view["box"] for view in views], dtype=torch.int64),
            "flip": torch.tensor([view["flip"] for view in views]),
            "jitter_on": torch.tensor([view["jitter_on"] for view in views]),
            "jitter": torch.tensor([view["jitter"] for view in views], dtype=torch.float32),
            "jitter_order": torch.tensor([view["jitter_order"] for view in views], dtype=torch.int64),
            "gray": torch.tensor([view["gray"] for view in views]),
            "blur_radius": torch.tensor([view["blur_radius"] for view in views], dtype=torch.float32),
            "solarize": torch.tensor([view["solarize"] for view in views]),
        }
        return DeviceSample(pixels, params)


def collate_device_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Loader samples ``{"views": DeviceSample, "index", "skipped"}`` -> one batch: ``images``
    (B, H_max, W_max, 3) uint8, each image at the top left of its slot, zeros elsewhere (the crop
    boxes never reach the padding), and ``params`` with (B, num_views, ...) tensors."""
    images = [sample["views"].image for sample in samples]
    height, width = max(image.shape[0] for image in images), max(image.shape[1] for image in images)
    batch = torch.zeros((len(images), height, width, 3), dtype=torch.uint8)
    for slot, image in zip(batch, images):
        slot[:image.shape[0], :image.shape[1]] = image
    return {
        "images": batch,
        "params": {key: torch.stack([sample["views"].params[key] for sample in samples]) for key in PARAM_KEYS},
        "index": torch.tensor([sample["index"] for sample in samples]),
        "skipped": sum(sample["skipped"] for sample in samples),
    }


# ============================================================================ device side: geometry


def _bicubic(x: Tensor, a: float = -0.5) -> Tensor:
    """PIL's bicubic filter (a = -0.5; torch's bicubic interpolation uses -0.75)."""
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def pil_bicubic_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """``(..., out_size, in_size)`` matrices resampling the window ``[start, start + length)`` of an
    axis of ``in_size`` pixels to ``out_size`` pixels as PIL's ``resize(BICUBIC)`` of the crop does
    (Pillow ``Resample.c: precompute_coeffs``): output pixel ``o`` is centred at ``(o + 0.5) * scale``
    in the window, the filter is stretched by ``max(scale, 1)`` (antialiasing when shrinking) and the
    taps that fall outside the window are dropped and the rest renormalised."""
    length = length.to(torch.float32)
    scale = length / out_size
    stretch = scale.clamp(min=1.0)
    device = start.device
    centre = (torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * scale[..., None]
    position = torch.arange(in_size, device=device, dtype=torch.float32) - start[..., None].to(torch.float32)
    inside = (position >= 0) & (position < length[..., None])
    weights = _bicubic((position[..., None, :] + 0.5 - centre[..., :, None]) / stretch[..., None, None])
    weights = weights * inside[..., None, :]
    return weights / weights.sum(-1, keepdim=True)


def resized_crops(images: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop ``boxes`` (B, V, 4) = (top, left, height, width) out of ``images`` (B, 3, H, W) float and
    resize each to ``size`` with PIL's bicubic: (V, B, 3, *size), clipped to [0, 1] as PIL clips."""
    _, _, in_height, in_width = images.shape
    top, left, height, width = boxes.unbind(-1)
    rows = pil_bicubic_weights(top, height, in_height, size[0])  # (B, V, out_h, H)
    cols = pil_bicubic_weights(left, width, in_width, size[1])  # (B, V, out_w, W)
    across = torch.einsum("bchw,bvow->vbcho", images, cols)
    return torch.einsum("bvph,vbcho->vbcpo", rows, across).clamp_(0.0, 1.0)


# ============================================================================ device side: colour


def _gray(x: Tensor) -> Tensor:
    weights = torch.tensor(_GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _per_sample(factor: Tensor) -> Tensor:
    return factor.view(-1, 1, 1, 1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """``other + factor (x - other)`` clipped to [0, 1] (PIL ``Image.blend(other, x, factor)``)."""
    return (other + _per_sample(factor) * (x - other)).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _gray(x), factor)


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """Rotate the hue of (N, 3, H, W) images in [0, 1] by ``factor`` (N,) turns (HSV, float)."""
    red, green, blue = x.unbind(1)
    value, _ = x.max(1)
    low, _ = x.min(1)
    chroma = value - low
    grey = chroma == 0
    saturation = chroma / torch.where(grey, torch.ones_like(value), value)
    safe_chroma = torch.where(grey, torch.ones_like(chroma), chroma)
    rc, gc, bc = ((value - channel) / safe_chroma for channel in (red, green, blue))
    hue = torch.where(value == red, bc - gc, torch.where(value == green, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(grey, torch.zeros_like(hue), hue)  # sixths of a turn, in [-1, 5)
    hue6 = torch.remainder(hue + 6.0 * _per_sample(factor)[:, 0], 6.0)  # in sixths of a turn
    # HSV -> RGB in closed form: channel n (r: 5, g: 3, b: 1) = v - v s clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6 h) mod 6 (colorsys.hsv_to_rgb's six sectors).
    chroma_scaled = (value * saturation)[:, None]
    offsets = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(offsets + hue6[:, None], 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (value[:, None] - chroma_scaled * ramp).clamp_(0.0, 1.0)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # torchvision's fn_idx order


def color_jitter(x: Tensor, on: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """torchvision ``ColorJitter`` with per-sample factors (N, 4) and per-sample order (N, 4), on the
    samples where ``on``; the others are returned unchanged."""
    x = x.clone()
    for step in range(4):
        for op_index, op in enumerate(_JITTER_OPS):
            chosen = (on & (order[:, step] == op_index)).nonzero().squeeze(1)
            if chosen.numel():
                x[chosen] = op(x[chosen], factors[chosen, op_index])
    return x


# ============================================================================ device side: blur


def _pil_box_radius(sigma: Tensor, passes: int) -> Tensor:
    """The extended-box radius PIL uses for a Gaussian of standard deviation ``sigma``
    (Pillow ``BoxBlur.c: _gaussian_blur_radius``, after Gwosdek et al. 2011)."""
    variance = sigma * sigma / passes
    box_length = torch.sqrt(12.0 * variance + 1.0)
    whole = torch.floor((box_length - 1.0) / 2.0)
    fraction = (2 * whole + 1) * (whole * (whole + 1) - 3 * variance) / (6 * (variance - (whole + 1) ** 2))
    return whole + fraction


def _box_pass(x: Tensor, kernel: Tensor, dim: int) -> Tensor:
    """One per-sample 1-D box pass along ``dim`` (-1 or -2), edges replicated as PIL does: a
    depthwise convolution, one filter per (sample, channel)."""
    batch, channels, height, width = x.shape
    taps = (kernel.shape[1] - 1) // 2
    padding = (taps, taps, 0, 0) if dim == -1 else (0, 0, taps, taps)
    padded = F.pad(x, padding, mode="replicate").flatten(0, 1)[None]  # (1, N C, H', W')
    weight = kernel.repeat_interleave(channels, dim=0)
    weight = weight.view(batch * channels, 1, 1, -1) if dim == -1 else weight.view(batch * channels, 1, -1, 1)
    return F.conv2d(padded, weight, groups=batch * channels).view(batch, channels, height, width)


def pil_gaussian_blur(x: Tensor, sigma: Tensor, passes: int = 3) -> Tensor:
    """PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` on (N, C, H, W) with per-sample ``sigma``:
    ``passes`` extended box blurs along the rows, then along the columns (a box of ``2 r + 1`` taps,
    ``r`` fractional: the two end taps weigh its fractional part)."""
    radius = _pil_box_radius(sigma.to(x.dtype), passes)
    whole = torch.floor(radius)
    taps = int(whole.max().item()) + 1
    distance = torch.arange(-taps, taps + 1, device=x.device, dtype=x.dtype).abs()
    inner = (distance[None, :] <= whole[:, None]).to(x.dtype)
    edge = (distance[None, :] == whole[:, None] + 1).to(x.dtype) * (radius - whole)[:, None]
    kernel = (inner + edge) / (2 * radius + 1)[:, None]
    for dim in (-1, -2):
        for _ in range(passes):
            x = _box_pass(x, kernel, dim)
    return x


# ============================================================================ the batch


class BatchedMultiCrop:
    """Device side of ``data.augment_on=gpu``: a collated batch -> ``[g1, g2, locals...]`` view
    batches, normalised, exactly the layout of ``MultiCropAugmentation`` + ``collate_views``."""

    def __init__(self, augmentation: MultiCropAugmentation) -> None:
        sampler = MultiCropParamSampler(augmentation)  # validates the published sequence
        recipe = sampler.local_recipe
        self.mean, self.std = recipe.mean, recipe.std
        self.groups = [(slice(0, augmentation.num_global), augmentation.global_size),
                       (slice(augmentation.num_global, augmentation.num_views), augmentation.local_size)]

    @torch.no_grad()
    def __call__(self, images: Tensor, params: dict[str, Tensor]) -> list[Tensor]:
        """``images`` (B, H, W, 3) uint8 and ``params`` (B, V, ...) as collated, on the device to run on."""
        pixels = images.permute(0, 3, 1, 2).float().div_(255.0)
        views: list[Tensor] = []
        for group, size in self.groups:
            crops = resized_crops(pixels, params["box"][:, group], size)  # (V, B, 3, h, w)
            num_views, batch = crops.shape[:2]
            flat = {key: value[:, group].transpose(0, 1).reshape(num_views * batch, *value.shape[2:])
                    for key, value in params.items()}
            out = self._pixel_ops(crops.reshape(num_views * batch, *crops.shape[2:]), flat)
            views += list(out.view(num_views, batch, *out.shape[1:]).unbind(0))
        return views

    def _pixel_ops(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Flip, colour jitter, grayscale, blur, solarise, normalise: the published order."""
        x = torch.where(_per_sample(params["flip"]), x.flip(-1), x)
        x = color_jitter(x, params["jitter_on"], params["jitter"], params["jitter_order"])
        x = torch.where(_per_sample(params["gray"]), _gray(x).expand_as(x), x)
        blurred = (params["blur_radius"] > 0).nonzero().squeeze(1)
        if blurred.numel():
            x[blurred] = pil_gaussian_blur(x[blurred], params["blur_radius"][blurred])
        # PIL solarises uint8 pixels >= 128: the float pixels that round to them.
        x = torch.where(_per_sample(params["solarize"]) & (x >= 127.5 / 255.0), 1.0 - x, x)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


def device_sample_views(batch: dict[str, Any], augment: BatchedMultiCrop, device: torch.device) -> list[Tensor]:
    """The view batches of a collated device batch, computed on ``device``."""
    images = batch["images"].to(device, non_blocking=True)
    params = {key: value.to(device, non_blocking=True) for key, value in batch["params"].items()}
    return augment(images, params)

