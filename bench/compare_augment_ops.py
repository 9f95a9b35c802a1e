"""How far kornia's, DALI's and passreid's device-side ops are from the published PIL ops, on the same parameters.

    pip install kornia==0.9.0 nvidia-dali-cuda120==2.4.0   # not dependencies of passreid; only this needs them
    python bench/compare_augment_ops.py [--images 64] [--size 128x256] [--market DIR] [--libraries kornia,dali]

Why ``data.augment_on=gpu`` is written in plain torch rather than with kornia or NVIDIA DALI: the device
path must give the published pipeline's views, so the measure is the pixel difference to PIL for the same
crop box / jitter factor / blur radius, in grey levels (0..255). On the first ``--images`` Market-1501
training JPEGs upscaled (bicubic) to ``--size`` (a LUPerson-like person crop), with parameters drawn as the
published transforms draw them (``RandomResizedCrop.get_params`` with the PASS scales, ``ColorJitter(0.4,
0.4, 0.2, 0.1)`` factors, blur radii in [0.1, 2.0]), each library's own op for each step:

* resized crop (the 2 globals at 256x128 and a band local at 128x64): PIL's bicubic (``TF.resized_crop``)
  against ``passreid.data.device_multicrop.resized_crops``, kornia's ``crop_and_resize`` (bicubic) and
  DALI's ``fn.resize`` on the box as region of interest (cubic, antialiased);
* brightness, contrast, saturation, hue: torchvision's ``adjust_*`` on the PIL image against passreid's
  ``adjust_*``, kornia's ``adjust_brightness_accumulative`` / ``adjust_contrast_with_mean_subtraction`` /
  ``adjust_saturation_with_gray_subtraction`` / ``adjust_hue`` (the ops of its ``ColorJitter``), and DALI's ``fn.brightness_contrast``
  (contrast about the image's grey mean, as PIL's) / ``fn.saturation`` / ``fn.hue``;
* blur: ``ImageFilter.GaussianBlur`` against ``pil_gaussian_blur``, kornia's ``gaussian_blur2d`` (kernel
  2 ceil(3 sigma) + 1, reflect borders) and DALI's ``fn.gaussian_blur``.

DALI runs its CPU operators here (``device_id=None``; no GPU needed) and returns uint8, so its figures
include the final rounding (at most 0.5 level), which passreid's and kornia's float outputs do not.
Prints mean and maximum absolute differences per op and library; writes ``bench/results/augment_ops.json``.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from passreid.data import device_multicrop as ours
from passreid.data.multicrop import band_rows

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
LEVELS = 255.0
LIBRARIES = {"kornia": "kornia", "dali": "nvidia-dali-cuda120"}  # name -> distribution
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2}  # the PASS ColorJitter, besides hue 0.1
Box = tuple[int, int, int, int]  # top, left, height, width in source pixels


def load_images(market: Path | None, count: int, size: tuple[int, int]) -> list[Image.Image]:
    root = market or Path(os.environ.get("PASSREID_MARKET1501", REPO.parent / "shared/data/Market-1501-v15.09.15"))
    files = sorted((root / "bounding_box_train").glob("*.jpg"))[:count]
    if not files:
        raise SystemExit(f"no Market-1501 JPEGs under {root}/bounding_box_train: pass --market DIR")
    return [Image.open(path).convert("RGB").resize(size, Image.BICUBIC) for path in files]


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / LEVELS


class Passreid:
    """passreid's device-side ops on a (1, 3, H, W) float image in [0, 1]."""

    def resized_crop(self, x: torch.Tensor, box: Box, size: tuple[int, int]) -> torch.Tensor:
        return ours.resized_crops(x, torch.tensor([[box]]), size)[0]

    def jitter(self, x: torch.Tensor, op: str, factor: float) -> torch.Tensor:
        return getattr(ours, f"adjust_{op}")(x, torch.tensor([factor]))

    def blur(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return ours.pil_gaussian_blur(x, torch.tensor([sigma]))


class Kornia:
    """kornia's closest ops (float, like passreid's)."""

    def __init__(self) -> None:
        from kornia import enhance, filters
        from kornia.geometry.transform import crop_and_resize
        self.enhance, self.filters, self.crop_and_resize = enhance, filters, crop_and_resize

    def resized_crop(self, x: torch.Tensor, box: Box, size: tuple[int, int]) -> torch.Tensor:
        top, left, h, w = box
        corners = torch.tensor([[[left, top], [left + w - 1, top], [left + w - 1, top + h - 1], [left, top + h - 1]]],
                               dtype=torch.float32)
        return self.crop_and_resize(x, corners, size, mode="bicubic").clamp(0, 1)

    def jitter(self, x: torch.Tensor, op: str, factor: float) -> torch.Tensor:
        if op == "hue":
            return self.enhance.adjust_hue(x, factor * 2 * math.pi)
        adjust = {"brightness": lambda: self.enhance.adjust_brightness_accumulative(x, factor),
                  "contrast": lambda: self.enhance.adjust_contrast_with_mean_subtraction(x, factor),
                  "saturation": lambda: self.enhance.adjust_saturation_with_gray_subtraction(x, factor)}[op]
        return adjust().clamp(0, 1)

    def blur(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.filters.gaussian_blur2d(x, 2 * math.ceil(3 * sigma) + 1, (sigma, sigma))


class Dali:
    """DALI's CPU operators, one single-sample pipeline per op with every parameter fed per sample."""

    def __init__(self) -> None:
        from nvidia.dali import fn, pipeline_def, types
        self.fn, self.types = fn, types
        self.pipeline_def = pipeline_def
        self.pipelines: dict[object, object] = {}

    def _run(self, key: object, graph: Callable, feeds: dict[str, np.ndarray]) -> torch.Tensor:
        if key not in self.pipelines:
            @self.pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True,
                                prefetch_queue_depth=1)  # one feed, one run
            def pipeline():
                nodes = {name: self.fn.external_source(name=name, layout="HWC" if name == "image" else None)
                         for name in feeds}
                return graph(**nodes)
            self.pipelines[key] = pipeline()
            self.pipelines[key].build()
        pipe = self.pipelines[key]
        for name, value in feeds.items():
            pipe.feed_input(name, [value])
        (out,) = pipe.run()
        return torch.from_numpy(np.array(out[0])).permute(2, 0, 1).float()[None] / LEVELS

    @staticmethod
    def _hwc(x: torch.Tensor) -> np.ndarray:
        return (x[0].permute(1, 2, 0) * LEVELS).round().to(torch.uint8).numpy()

    def resized_crop(self, x: torch.Tensor, box: Box, size: tuple[int, int]) -> torch.Tensor:
        top, left, h, w = box
        def graph(image, anchor, shape):  # cut the box out first: a region-of-interest resize reads past it
            box = self.fn.slice(image, anchor, shape, axes=[0, 1])
            return self.fn.resize(box, resize_y=size[0], resize_x=size[1], interp_type=self.types.INTERP_CUBIC,
                                  antialias=True)
        return self._run(("crop", size), graph, {"image": self._hwc(x), "anchor": np.int64([top, left]),
                                                 "shape": np.int64([h, w])})

    def jitter(self, x: torch.Tensor, op: str, factor: float) -> torch.Tensor:
        feeds = {"image": self._hwc(x), "factor": np.float32(factor)}
        if op == "contrast":  # PIL blends with the rounded mean of the "L" image, DALI with contrast_center
            grey = np.asarray(Image.fromarray(feeds["image"]).convert("L"), dtype=np.float64)
            feeds["center"] = np.float32(int(grey.mean() + 0.5))
        graphs = {"brightness": lambda image, factor: self.fn.brightness_contrast(image, brightness=factor),
                  "contrast": lambda image, factor, center: self.fn.brightness_contrast(
                      image, contrast=factor, contrast_center=center),
                  "saturation": lambda image, factor: self.fn.saturation(image, saturation=factor),
                  "hue": lambda image, factor: self.fn.hue(image, hue=factor * 360.0)}  # degrees
        return self._run(op, graphs[op], feeds)

    def blur(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return self._run("blur", lambda image, sigma: self.fn.gaussian_blur(image, sigma=sigma),
                         {"image": self._hwc(x), "sigma": np.float32(sigma)})


def load_libraries(names: list[str]) -> dict[str, object]:
    factories = {"kornia": Kornia, "dali": Dali}
    libraries: dict[str, object] = {"passreid": Passreid()}
    for name in names:
        if name not in factories:
            raise SystemExit(f"--libraries: unknown library {name!r}; expected some of {sorted(factories)}")
        try:
            libraries[name] = factories[name]()
        except ImportError as error:
            raise SystemExit(f"compare_augment_ops.py needs {name} ({error}): pip install {LIBRARIES[name]}")
    return libraries


def crop_jobs(image: Image.Image) -> list[tuple[Box, tuple[int, int], Image.Image]]:
    """Two globals of the whole image and one local of its top band, boxes drawn as the published crops
    draw them, in whole-image coordinates, each with the PIL reference view."""
    width, height = image.size
    band_top, band_height = band_rows(height)[0]
    jobs = []
    for scale, size, top0, rows in [((0.4, 1.0), (256, 128), 0, height)] * 2 + \
                                   [((0.1, 0.8), (128, 64), band_top, band_height)]:
        source = image.crop((0, top0, width, top0 + rows))
        top, left, h, w = T.RandomResizedCrop.get_params(source, scale, (3 / 4, 4 / 3))
        reference = TF.resized_crop(source, top, left, h, w, list(size), InterpolationMode.BICUBIC)
        jobs.append(((top0 + top, left, h, w), size, reference))
    return jobs


def compare(images: list[Image.Image], libraries: dict[str, object]) -> dict[str, dict[str, list[torch.Tensor]]]:
    ops = ["resized_crop", *JITTER, "hue", "blur"]
    diffs: dict[str, dict[str, list[torch.Tensor]]] = {op: {name: [] for name in libraries} for op in ops}

    def record(op: str, reference: Image.Image, outputs: Callable[[object], torch.Tensor]) -> None:
        target = to_tensor(reference)
        for name, library in libraries.items():
            diffs[op][name].append((outputs(library) - target).abs())

    torch.manual_seed(0)
    for image in images:
        x = to_tensor(image)
        for box, size, reference in crop_jobs(image):
            record("resized_crop", reference, lambda library: library.resized_crop(x, box, size))
        for op, strength in JITTER.items():
            factor = float(torch.empty(1).uniform_(1 - strength, 1 + strength))
            reference = getattr(TF, f"adjust_{op}")(image, factor)
            record(op, reference, lambda library: library.jitter(x, op, factor))
        factor = float(torch.empty(1).uniform_(-0.1, 0.1))
        record("hue", TF.adjust_hue(image, factor), lambda library: library.jitter(x, "hue", factor))
        sigma = float(torch.empty(1).uniform_(0.1, 2.0))
        record("blur", image.filter(ImageFilter.GaussianBlur(radius=sigma)), lambda library: library.blur(x, sigma))
    return diffs


def summary(diffs: list[torch.Tensor]) -> dict[str, float]:
    flat = torch.cat([d.flatten() for d in diffs]) * LEVELS
    return {"mean_abs_levels": round(float(flat.mean()), 3), "max_abs_levels": round(float(flat.max()), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", default="128x256", help="W x H the Market JPEGs are upscaled to")
    parser.add_argument("--market", type=Path, default=None)
    parser.add_argument("--libraries", default="kornia,dali", help="comma-separated, from: kornia, dali")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "augment_ops.json")
    args = parser.parse_args()
    libraries = load_libraries([name for name in args.libraries.split(",") if name])
    width, height = (int(value) for value in args.size.lower().split("x"))
    diffs = compare(load_images(args.market, args.images, (width, height)), libraries)
    versions = {name: importlib.metadata.version(dist) for name, dist in LIBRARIES.items() if name in libraries}
    result = {"name": "augment_ops", "images": args.images, "size_wh": [width, height],
              "ops": {op: {name: summary(values) for name, values in sides.items()} for op, sides in diffs.items()},
              **versions, "torch": torch.__version__, "pillow": Image.__version__,
              "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for op, sides in result["ops"].items():
        print(f"{op:13s}" + "; ".join(f"{name} {s['mean_abs_levels']} mean / {s['max_abs_levels']} max"
                                      for name, s in sides.items()) + " (levels)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
