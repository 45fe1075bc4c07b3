"""The PNG of a search: the query (the image, or the text drawn on a card), then its ranked
results, each captioned with rank, score and identity."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from clipid.search.query import SearchResult

__all__ = ["draw_results"]

CAPTION_H = 28
GAP = 10


def _square(path: str, size: int) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = size / max(im.size)  # up or down: cached images are often smaller than a tile
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.Resampling.BICUBIC)
    tile = Image.new("RGB", (size, size), "white")
    tile.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return tile


def _text_card(text: str, size: int) -> Image.Image:
    card = Image.new("RGB", (size, size), (240, 240, 240))
    lines = textwrap.wrap(text, width=max(8, size // 7))[: size // 14]
    ImageDraw.Draw(card).multiline_text((6, 6), "\n".join(lines), fill="black", spacing=3)
    return card


def draw_results(result: SearchResult, out: Path, size: int = 128, per_row: int = 5) -> Path:
    """Write ``out``: the query tile on the left, the results in rows of ``per_row``."""
    hits = result.hits
    rows = max(1, -(-len(hits) // per_row))
    cell_h = size + CAPTION_H
    canvas = Image.new("RGB", (size + GAP + per_row * size + GAP, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    query = _square(result.query, size) if result.kind == "image" else \
        _text_card(result.query, size)
    canvas.paste(query, (0, 0))
    draw.text((4, size + 4), f"query ({result.model})", fill="black")
    draw.line([(size + GAP // 2, 0), (size + GAP // 2, canvas.height)], fill=(180, 180, 180))
    for i, hit in enumerate(hits):
        x = size + GAP + (i % per_row) * size
        y = (i // per_row) * cell_h
        canvas.paste(_square(hit.image, size - 4), (x + 2, y + 2))
        draw.text((x + 4, y + size + 2), f"#{hit.rank} {hit.score:.3f}", fill="black")
        draw.text((x + 4, y + size + 14), hit.item_id[:size // 7], fill=(60, 60, 60))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
