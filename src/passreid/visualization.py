"""Ranked lists, attention maps and part maps as images and one HTML page (``tools/search.py``,
``tools/visualize_ranks.py``).

Ranking: :func:`rank_gallery` takes a query-chunked distance (``LoadedModel.test_distance``, so a
method's own test distance is used when it has one) and returns the top-k gallery indices per query,
ties broken by gallery index like the evaluation.

Maps, for any model with a passreid :class:`~passreid.models.VisionTransformer` inside:

* :func:`token_attention_maps`: attention of the [CLS] token and of each part token to the patches in
  the last block (head-averaged softmax(QK^T/sqrt(d)), each map scaled to [0, 1]);
* :func:`part_view`: named per-part features (for per-part distances) and optional part heatmaps and
  visibility. A model may provide its own by defining ``visual_parts(images, camids=None)`` returning
  a dict with ``names`` (K strings) and any of ``features`` (B, K, D), ``visibility`` (B, K) in [0, 1]
  and ``maps`` (B, K, h, w); BPBReID-style part models do this to show their part attention maps.
  Otherwise a ViT with PASS part tokens gives ``[CLS]`` and ``part k`` token features (final-LN outputs)
  and its attention maps as heatmaps; a ViT without part tokens gives the [CLS] map only.

Per-part distances are squared Euclidean distances of L2-normalised part features (2 - 2 cos, the test
distance of a single feature), shown as ``n/a`` where a part is not visible in both images.
"""
from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor

from passreid.atomic_files import atomic_write_text
from passreid.data.images import read_image
from passreid.eval.distance import DistanceChunkFn

__all__ = [
    "MATCH_COLORS",
    "PartView",
    "RankHit",
    "RankedList",
    "RankRow",
    "format_distance",
    "format_part_distances",
    "heatmap_overlay",
    "part_distances",
    "part_view",
    "rank_gallery",
    "rank_strip",
    "token_attention_maps",
    "write_rank_html",
]

MATCH_COLORS = {True: (0, 170, 0), False: (220, 0, 0), None: (150, 150, 150)}
_CSS_CLASS = {True: "match", False: "mismatch", None: "unknown"}


# ------------------------------------------------------------------------------------------- ranking


@dataclass
class RankedList:
    """Top-k gallery indices (ascending distance, ties by index) and their distances, for one query."""

    indices: np.ndarray
    distances: np.ndarray


def rank_gallery(distance: DistanceChunkFn, num_query: int, topk: int, *, chunk_size: int = 256,
                 exclude: Callable[[int], np.ndarray] | None = None) -> list[RankedList]:
    """Top-``topk`` gallery entries per query from a chunked distance ``fn(q0, q1) -> (q1 - q0, G)``.

    ``exclude(q)``: boolean (G,) mask of gallery entries that query ``q`` must not retrieve (e.g. the
    same identity seen by the same camera, the Market-1501 protocol), made when query ``q`` is ranked: no
    (Q, G) mask is held for a large gallery.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    ranked = []
    for start in range(0, num_query, chunk_size):
        end = min(start + chunk_size, num_query)
        rows = distance(start, end).float().cpu()
        for offset, row in enumerate(rows):
            order = torch.sort(row, stable=True).indices.numpy()
            if exclude is not None:
                order = order[~exclude(start + offset)[order]]
            top = order[:topk]
            ranked.append(RankedList(top, row.numpy()[top]))
    return ranked


# ------------------------------------------------------------------------------------------- images


def _thumbnail(image: Image.Image | str, size: tuple[int, int]) -> Image.Image:
    """``size`` = (height, width)."""
    if not isinstance(image, Image.Image):
        image = read_image(image)
    return image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)


def rank_strip(query: Image.Image | str, hits: Sequence[tuple[Image.Image | str, str, bool | None]],
               thumb_size: tuple[int, int] = (128, 64), border: int = 4) -> Image.Image:
    """One PNG-ready strip: the query (grey frame), then each hit with a green (same identity), red
    (different) or grey (unknown) frame and its caption (e.g. the distance) below."""
    height, width = thumb_size
    caption_h, gap = 14, 6
    cell_w = width + 2 * border
    canvas = Image.new("RGB", ((cell_w + gap) * (1 + len(hits)) + gap, height + 2 * border + caption_h + 2 * gap),
                       "white")
    draw = ImageDraw.Draw(canvas)
    cells = [(query, "query", None)] + list(hits)
    for position, (image, caption, match) in enumerate(cells):
        left = gap + position * (cell_w + gap) + (gap if position else 0) // 2
        framed = ImageOps.expand(_thumbnail(image, thumb_size), border=border,
                                 fill=(60, 60, 200) if position == 0 else MATCH_COLORS[match])
        canvas.paste(framed, (left, gap))
        draw.text((left, gap + height + 2 * border + 1), caption[: cell_w // 6], fill="black")
    return canvas


def _jet(values: np.ndarray) -> np.ndarray:
    """A jet-like colormap of values in [0, 1] -> (..., 3) floats in [0, 1]."""
    scaled = 4.0 * values[..., None]
    return np.clip(1.5 - np.abs(scaled - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def heatmap_overlay(image: Image.Image | str, heatmap: np.ndarray | Tensor, size: tuple[int, int] = (128, 64),
                    alpha: float = 0.5) -> Image.Image:
    """``heatmap`` (h, w) with values in [0, 1], resized bilinearly to ``size`` and blended over the image."""
    base = np.asarray(_thumbnail(image, size), dtype=np.float32) / 255.0
    heat = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))[None, None]
    heat = torch.nn.functional.interpolate(heat, size=size, mode="bilinear", align_corners=False)[0, 0]
    blended = (1 - alpha) * base + alpha * _jet(heat.clamp(0, 1).numpy())
    return Image.fromarray((blended * 255).round().astype(np.uint8))


# ------------------------------------------------------------------------------------- maps, parts


def _encode(loaded, images: Tensor, n_blocks: int, camids: Tensor | None) -> Tensor:
    """Tokens after ``n_blocks`` blocks (no final LN); SIE models add their camera embedding via ``encode``."""
    network, backbone = loaded.network, loaded.backbone
    if loaded.uses_cameras and callable(getattr(network, "encode", None)):
        return network.encode(images, n_blocks, camids)
    return backbone.forward_until(images, n_blocks)


@torch.no_grad()
def token_attention_maps(loaded, images: Tensor, camids: Tensor | None = None) -> tuple[list[str], Tensor]:
    """``(names, maps)``: last-block attention of the [CLS] and part tokens to the patches,
    ``maps`` (B, T, h, w) head-averaged and each scaled to [0, 1]; ``names`` = [CLS], part 1, ..."""
    backbone = loaded.backbone
    if backbone is None:
        raise ValueError(f"{loaded.source}: attention maps need a ViT backbone, this model has none")
    tokens = _encode(loaded, images, backbone.depth - 1, camids)
    probs = backbone.attention_probabilities(backbone.depth - 1, tokens).mean(dim=1)  # (B, L, L)
    leading = backbone.num_leading_tokens()
    grid = backbone.patch_embed.grid_size(images.shape[-2], images.shape[-1])
    maps = probs[:, :leading, leading:].reshape(images.shape[0], leading, *grid)
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    maps = (maps - low) / (high - low).clamp(min=1e-12)
    names = ["[CLS]"] + [f"part {k + 1}" for k in range(leading - 1)]
    return names, maps.cpu()


@dataclass
class PartView:
    """Named parts of a batch: features (B, K, D) for per-part distances, optional visibility (B, K) and
    heatmaps (B, K, h, w) in [0, 1]."""

    names: list[str]
    features: Tensor | None = None
    visibility: Tensor | None = None
    maps: Tensor | None = None
    source: str = ""


def _normalise_maps(maps: Tensor) -> Tensor:
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low).clamp(min=1e-12)


@torch.no_grad()
def part_view(loaded, images: Tensor, camids: Tensor | None = None) -> PartView | None:
    """The model's parts for ``images`` (module docstring); ``None`` when it exposes none."""
    network = loaded.network
    hook = getattr(network, "visual_parts", None)
    if callable(hook):
        out = hook(images, camids=camids)
        if not isinstance(out, dict) or "names" not in out:
            raise TypeError(f"{type(network).__name__}.visual_parts must return a dict with 'names' and any of "
                            "'features', 'visibility', 'maps'")
        maps = out.get("maps")
        return PartView(list(out["names"]), _cpu(out.get("features")), _cpu(out.get("visibility")),
                        _normalise_maps(maps.float()).cpu() if maps is not None else None,
                        source=f"{type(network).__name__}.visual_parts")
    backbone = loaded.backbone
    if backbone is None:
        return None
    names, maps = token_attention_maps(loaded, images, camids)
    leading = backbone.num_leading_tokens()
    tokens = backbone.norm(_encode(loaded, images, backbone.depth, camids))[:, :leading]
    return PartView(names, tokens.float().cpu(), None, maps, source="ViT [CLS]/part tokens, last-block attention")


def _cpu(value: Tensor | None) -> Tensor | None:
    return value.detach().float().cpu() if value is not None else None


def part_distances(query: PartView, query_index: int, gallery: PartView, gallery_index: int) -> list[float | None]:
    """Per-part squared Euclidean distances of L2-normalised part features; ``None`` for a part that is
    not visible (visibility <= 0.5) in both images, or when the parts carry no features."""
    if query.features is None or gallery.features is None:
        return [None] * len(query.names)
    q = torch.nn.functional.normalize(query.features[query_index], dim=-1)
    g = torch.nn.functional.normalize(gallery.features[gallery_index], dim=-1)
    dist = (q - g).pow(2).sum(-1)
    visible = torch.ones(len(dist), dtype=torch.bool)
    if query.visibility is not None:
        visible &= query.visibility[query_index] > 0.5
    if gallery.visibility is not None:
        visible &= gallery.visibility[gallery_index] > 0.5
    return [float(d) if v else None for d, v in zip(dist, visible)]


# ------------------------------------------------------------------------------------------- HTML


def format_distance(distance: float) -> str:
    """A distance with 4 significant digits (``2.317e-05``, ``0.4821``, ``1.37``): the distances of a trained
    model between similar images can be ~1e-5, which a fixed ``.4f`` would print as 0.0000."""
    return f"{distance:.4g}"


def format_part_distances(names: Sequence[str], distances: Sequence[float | None]) -> str:
    """``[CLS]:0.1234 part 1:2.5e-05 part 2:n/a`` (``n/a``: the part is not visible in both images)."""
    return " ".join(f"{name}:{'n/a' if d is None else format_distance(d)}" for name, d in zip(names, distances))


@dataclass
class RankHit:
    image: Image.Image | str
    label: str
    distance: float
    match: bool | None
    details: list[str] = field(default_factory=list)


@dataclass
class RankRow:
    """One query row of the HTML page: the query and its ranked hits; ``extra_images`` (e.g. attention
    maps) are shown under the row."""

    query: Image.Image | str
    label: str
    hits: list[RankHit]
    details: list[str] = field(default_factory=list)
    extra_images: list[tuple[str, str]] = field(default_factory=list)  # (caption, relative path of a PNG)


def _data_uri(image: Image.Image | str, size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    _thumbnail(image, size).save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _cell(image: Image.Image | str, size: tuple[int, int], lines: Sequence[str], css: str) -> str:
    text = "".join(f"<div>{html.escape(line)}</div>" for line in lines)
    return f'<td class="{css}"><img src="{_data_uri(image, size)}" alt="">{text}</td>'


_STYLE = """body{font-family:sans-serif;font-size:12px;margin:12px}
table.ranks{border-collapse:separate;border-spacing:4px}
td{vertical-align:top;text-align:center;padding:2px;max-width:110px;word-wrap:break-word}
td img{display:block;margin:auto;border:4px solid #999}
td.query img{border-color:#3c3cc8} td.match img{border-color:#00aa00} td.mismatch img{border-color:#dc0000}
tr.extra td{text-align:left} tr.extra img{display:inline-block;border:none;margin-right:8px}
.legend span{padding:0 6px;margin-right:8px;border:3px solid}"""


def write_rank_html(rows: Sequence[RankRow], path: str | os.PathLike, *, title: str, notes: Sequence[str] = (),
                    thumb_size: tuple[int, int] = (128, 64)) -> None:
    """A self-contained page (thumbnails embedded): one ``<tr class="query-row">`` per query with the
    query and its ranked hits (distance, green/red frame when identities are known)."""
    topk = max((len(row.hits) for row in rows), default=0)
    header = "<tr><th>query</th>" + "".join(f"<th>rank {k + 1}</th>" for k in range(topk)) + "</tr>"
    body = []
    for row in rows:
        cells = [_cell(row.query, thumb_size, [row.label, *row.details], "query")]
        for rank, hit in enumerate(row.hits, start=1):
            lines = [f"#{rank} d={format_distance(hit.distance)}", hit.label, *hit.details]
            cells.append(_cell(hit.image, thumb_size, lines, _CSS_CLASS[hit.match]))
        body.append(f'<tr class="query-row" data-query="{html.escape(row.label, quote=True)}">{"".join(cells)}</tr>')
        if row.extra_images:
            figures = "".join(f'<figure style="display:inline-block"><img src="{html.escape(src, quote=True)}" '
                              f'alt=""><figcaption>{html.escape(cap)}</figcaption></figure>'
                              for cap, src in row.extra_images)
            body.append(f'<tr class="extra"><td colspan="{topk + 1}">{figures}</td></tr>')
    legend = ('<p class="legend"><span style="border-color:#00aa00">same identity</span>'
              '<span style="border-color:#dc0000">different identity</span>'
              '<span style="border-color:#999">identity unknown</span></p>')
    notes_html = "".join(f"<p>{html.escape(note)}</p>" for note in notes)
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{notes_html}{legend}"
            f'<table class="ranks"><thead>{header}</thead><tbody>{"".join(body)}</tbody></table></body></html>\n')
    atomic_write_text(path, page, what="page")
