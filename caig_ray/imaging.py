"""Image helpers shared by both renderers, the readers and the reward model's pair input."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw


def place_product(product: Image.Image, size: int, fill: float = 0.78) -> Image.Image:
    """Crop an RGBA product to its alpha box and centre it on a transparent ``size``² canvas,
    its longer side ``fill`` of the canvas side (CAIG: 0.78 of 512)."""
    rgba = product.convert("RGBA")
    box = rgba.getchannel("A").getbbox()
    if box is None:
        raise ValueError("product image is fully transparent: no product pixels to place")
    crop = rgba.crop(box)
    scale = fill * size / max(crop.size)
    w, h = max(1, round(crop.width * scale)), max(1, round(crop.height * scale))
    crop = crop.resize((w, h), Image.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.paste(crop, ((size - w) // 2, (size - h) // 2))
    return canvas


def paste_product(background: Image.Image, placed: Image.Image) -> Image.Image:
    """Put the placed product (RGBA, same size) back over a background with its own alpha."""
    out = background.convert("RGB").copy()
    out.paste(placed.convert("RGB"), (0, 0), placed.getchannel("A"))
    return out


def rgba_from_white_background(img: Image.Image, thresh: int = 12) -> Image.Image:
    """RGB product on white -> RGBA: white connected to the border becomes transparent
    (a flood fill, so white inside the product stays opaque)."""
    rgb = img.convert("RGB")
    marker = rgb.copy()
    sentinel = (1, 254, 3)
    w, h = rgb.size
    for xy in ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)):
        if marker.getpixel(xy) != sentinel and min(marker.getpixel(xy)) >= 255 - thresh:
            ImageDraw.floodfill(marker, xy, sentinel, thresh=thresh)
    alpha = np.where(np.all(np.asarray(marker) == sentinel, axis=-1), 0, 255).astype(np.uint8)
    out = rgb.convert("RGBA")
    out.putalpha(Image.fromarray(alpha))
    return out


def side_by_side(left: Image.Image, right: Image.Image, size: int) -> Image.Image:
    """The RM's pair input: both ads resized to ``size``² and concatenated horizontally."""
    out = Image.new("RGB", (2 * size, size))
    out.paste(left.convert("RGB").resize((size, size), Image.BICUBIC), (0, 0))
    out.paste(right.convert("RGB").resize((size, size), Image.BICUBIC), (size, 0))
    return out


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class RenderedAd:
    """One rendered ad. ``latent`` holds what the procedural renderer drew (None for diffusers)."""

    image: Image.Image
    description: str
    seed: int
    latent: dict | None = None


class AdRenderer(Protocol):
    """What every renderer offers: batched, seeded, product pixels kept."""

    kind: str

    def render(self, products: list[Image.Image], descriptions: list[str], seeds: list[int]) -> list[RenderedAd]: ...
