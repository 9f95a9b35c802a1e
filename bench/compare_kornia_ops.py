"""How far kornia's ops and passreid's device-side ops are from the published PIL ops, on the same parameters.

    pip install kornia   # not a dependency of passreid; only this comparison needs it
    python bench/compare_kornia_ops.py [--images 64] [--size 128x256] [--market DIR]

Why ``data.augment_on=gpu`` is written in plain torch rather than with kornia: the device path must give
the published pipeline's views, so the measure is the pixel difference to PIL for the same crop box /
hue factor / blur radius, in grey levels (0..255). On the first ``--images`` Market-1501 training JPEGs
upscaled (bicubic) to ``--size`` (a LUPerson-like person crop), with parameters drawn by the published
transforms (``RandomResizedCrop.get_params`` with the PASS scales, hue factors in [-0.1, 0.1], blur
radii in [0.1, 2.0]):

* resized crop (the 2 globals at 256x128 and a band local at 128x64): PIL's bicubic (``TF.resized_crop``)
  against ``passreid.data.device_multicrop.resized_crops`` and kornia's ``crop_and_resize`` (bicubic);
* hue: ``TF.adjust_hue`` on the PIL image against ``adjust_hue`` and ``kornia.enhance.adjust_hue``;
* blur: ``ImageFilter.GaussianBlur`` against ``pil_gaussian_blur`` and ``kornia.filters.gaussian_blur2d``
  (kernel 2 ceil(3 sigma) + 1, reflect borders).

Prints mean and maximum absolute differences per op and writes ``bench/results/kornia_ops.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from passreid.data.device_multicrop import adjust_hue, pil_gaussian_blur, resized_crops
from passreid.data.multicrop import band_rows

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
LEVELS = 255.0


def load_images(market: Path | None, count: int, size: tuple[int, int]) -> list[Image.Image]:
    root = market or Path(os.environ.get("PASSREID_MARKET1501", REPO.parent / "shared/data/Market-1501-v15.09.15"))
    files = sorted((root / "bounding_box_train").glob("*.jpg"))[:count]
    if not files:
        raise SystemExit(f"no Market-1501 JPEGs under {root}/bounding_box_train: pass --market DIR")
    return [Image.open(path).convert("RGB").resize(size, Image.BICUBIC) for path in files]


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / LEVELS


def summary(diffs: list[torch.Tensor]) -> dict[str, float]:
    flat = torch.cat([d.flatten() for d in diffs]) * LEVELS
    return {"mean_abs_levels": round(float(flat.mean()), 3), "max_abs_levels": round(float(flat.max()), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", default="128x256", help="W x H the Market JPEGs are upscaled to")
    parser.add_argument("--market", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "kornia_ops.json")
    args = parser.parse_args()
    try:
        import kornia
        from kornia.enhance import adjust_hue as kornia_hue
        from kornia.filters import gaussian_blur2d
        from kornia.geometry.transform import crop_and_resize
    except ImportError:
        raise SystemExit("compare_kornia_ops.py needs kornia: pip install kornia")
    width, height = (int(value) for value in args.size.lower().split("x"))
    images = load_images(args.market, args.images, (width, height))
    torch.manual_seed(0)
    diffs: dict[str, dict[str, list[torch.Tensor]]] = {op: {"passreid": [], "kornia": []}
                                                       for op in ("resized_crop", "hue", "blur")}
    for image in images:
        x = to_tensor(image)
        # resized crops: two globals of the whole image, one local of the top band, as the published crops
        band_top, band_height = band_rows(height)[0]
        jobs = [((0.4, 1.0), (256, 128), 0, height)] * 2 + [((0.1, 0.8), (128, 64), band_top, band_height)]
        for scale, size, top0, rows in jobs:
            source = image.crop((0, top0, width, top0 + rows))
            top, left, h, w = T.RandomResizedCrop.get_params(source, scale, (3 / 4, 4 / 3))
            reference = to_tensor(TF.resized_crop(source, top, left, h, w, list(size), InterpolationMode.BICUBIC))
            box = torch.tensor([[[top0 + top, left, h, w]]])
            ours = resized_crops(x, box, size)[0]
            corners = torch.tensor([[[left, top0 + top], [left + w - 1, top0 + top],
                                     [left + w - 1, top0 + top + h - 1], [left, top0 + top + h - 1]]],
                                   dtype=torch.float32)
            theirs = crop_and_resize(x, corners, size, mode="bicubic").clamp(0, 1)
            diffs["resized_crop"]["passreid"].append((ours - reference).abs())
            diffs["resized_crop"]["kornia"].append((theirs - reference).abs())
        factor = float(torch.empty(1).uniform_(-0.1, 0.1))
        reference = to_tensor(TF.adjust_hue(image, factor))
        diffs["hue"]["passreid"].append((adjust_hue(x, torch.tensor([factor])) - reference).abs())
        diffs["hue"]["kornia"].append((kornia_hue(x, factor * 2 * math.pi) - reference).abs())
        sigma = float(torch.empty(1).uniform_(0.1, 2.0))
        reference = to_tensor(image.filter(ImageFilter.GaussianBlur(radius=sigma)))
        diffs["blur"]["passreid"].append((pil_gaussian_blur(x, torch.tensor([sigma])) - reference).abs())
        kernel = 2 * math.ceil(3 * sigma) + 1
        diffs["blur"]["kornia"].append((gaussian_blur2d(x, kernel, (sigma, sigma)) - reference).abs())
    result = {"name": "kornia_ops", "images": len(images), "size_wh": [width, height],
              "ops": {op: {side: summary(values) for side, values in sides.items()} for op, sides in diffs.items()},
              "kornia": kornia.__version__, "torch": torch.__version__, "pillow": Image.__version__,
              "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for op, sides in result["ops"].items():
        print(f"{op}: passreid {sides['passreid']['mean_abs_levels']} mean / {sides['passreid']['max_abs_levels']} "
              f"max levels; kornia {sides['kornia']['mean_abs_levels']} / {sides['kornia']['max_abs_levels']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
