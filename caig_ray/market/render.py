"""The procedural renderer: (product image, description, seed) -> ad image whose background
visibly reflects the description's scene, palette, lighting and clutter; product pixels kept.

It implements the same interface as the diffusers renderer (``render``) and, unlike it, records
the latent attributes it rendered so the market's oracles can score the ad.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from caig_ray.imaging import RenderedAd, paste_product, place_product
from caig_ray.market.language import parse_description

# scene -> (top colour, bottom colour) of the base gradient
_SCENE_BASE = {
    "plain": ((200, 200, 200), (170, 170, 170)),
    "stadium": ((60, 70, 90), (40, 140, 50)),
    "street": ((150, 160, 175), (90, 90, 95)),
    "studio": ((235, 235, 240), (205, 205, 212)),
    "vanity": ((245, 205, 215), (230, 180, 190)),
    "marble": ((240, 240, 238), (215, 215, 212)),
    "desk": ((200, 195, 185), (120, 80, 45)),
    "kitchen": ((230, 225, 210), (170, 150, 120)),
    "beach": ((110, 180, 240), (230, 205, 150)),
    "playroom": ((250, 230, 120), (120, 200, 240)),
    "neon": ((25, 10, 45), (10, 10, 25)),
}


def _pattern(d: ImageDraw.ImageDraw, scene: str, s: int, rng: np.random.Generator) -> None:
    """Scene-specific marks; positions jitter with the seed. Every mark is at least ~s/40 wide (3 px
    at 112): what sets a scene apart must survive the models' input size (docs/market.md)."""
    j = lambda a: a * s + rng.uniform(-0.03, 0.03) * s  # noqa: E731
    w = max(2, s // 36)  # the thinnest mark
    if scene == "stadium":
        for k in range(3):
            d.line([0, j(0.6 + 0.13 * k), s, j(0.6 + 0.13 * k)], fill=(240, 240, 240), width=w)
        for _ in range(14):  # the crowd: blobs, not single pixels
            x, y, r = rng.uniform(0, s), rng.uniform(0, 0.38 * s), s / 40
            d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(120, 255, 3)))
    elif scene == "street":
        for k in range(5):
            x0 = j(0.2 * k)
            d.rectangle([x0, j(0.1), x0 + 0.15 * s, 0.55 * s], fill=(110, 115, 130))
        d.line([0, 0.8 * s, s, 0.8 * s], fill=(240, 220, 60), width=w)
    elif scene == "vanity":
        d.ellipse([j(0.25), j(0.05), j(0.75), j(0.55)], outline=(210, 170, 90), width=max(w, s // 24))
    elif scene == "marble":
        for _ in range(5):
            pts = [(rng.uniform(0, s), rng.uniform(0, s)) for _ in range(3)]
            d.line(pts, fill=(150, 150, 158), width=w)
    elif scene == "desk":
        d.rectangle([j(0.05), j(0.1), j(0.35), j(0.35)], fill=(30, 30, 35))
        d.line([0, 0.62 * s, s, 0.62 * s], fill=(90, 60, 35), width=max(w, s // 30))
    elif scene == "kitchen":
        step = max(6, s // 6)
        for y in range(0, int(0.6 * s), step):
            d.line([0, y, s, y], fill=(190, 185, 172), width=w)
        for x in range(0, s, step):
            d.line([x, 0, x, 0.6 * s], fill=(190, 185, 172), width=w)
    elif scene == "beach":
        d.rectangle([0, j(0.45), s, j(0.6)], fill=(40, 110, 190))
        d.ellipse([j(0.75), j(0.05), j(0.9), j(0.2)], fill=(255, 230, 90))
    elif scene == "playroom":
        for _ in range(8):
            x, y = rng.uniform(0, s), rng.uniform(0.6 * s, s)
            c = tuple(int(v) for v in rng.choice([(230, 60, 60), (60, 160, 60), (60, 90, 230), (250, 200, 40)]))
            d.rectangle([x, y, x + 0.08 * s, y + 0.08 * s], fill=c)
    elif scene == "neon":
        for _ in range(5):
            c = tuple(int(v) for v in rng.choice([(255, 40, 200), (40, 240, 255), (170, 60, 255)]))
            y = rng.uniform(0, s)
            d.line([0, y, s, y + rng.uniform(-0.3, 0.3) * s], fill=c, width=max(w, s // 20))


def _apply_palette(arr: np.ndarray, palette: str) -> np.ndarray:
    grey = arr.mean(axis=-1, keepdims=True)
    if palette == "vivid":
        arr = grey + 1.8 * (arr - grey)
    elif palette == "pastel":
        arr = grey * 0.3 + arr * 0.7 + 40
    elif palette == "neutral":
        arr = grey + 0.5 * (arr - grey)
    elif palette == "dark":
        arr = arr * 0.45
    elif palette == "warm":
        arr = arr + np.array([40, 15, -35])
    elif palette == "cool":
        arr = arr + np.array([-35, 5, 40])
    return arr


def _apply_lighting(arr: np.ndarray, lighting: str) -> np.ndarray:
    s = arr.shape[0]
    if lighting == "bright":
        arr = arr * 1.2 + 20
    elif lighting == "dim":
        arr = arr * 0.6
    elif lighting == "soft":  # flat light: contrast pulled towards the mean (visible on any background)
        arr = 0.75 * arr + 0.25 * arr.mean() + 12
    elif lighting == "dramatic":
        yy, xx = np.mgrid[0:s, 0:s] / max(1, s - 1) - 0.5
        arr = arr * (1.25 - 1.6 * (xx**2 + yy**2))[..., None]
    return arr


def render_background(desc: str, size: int, seed: int) -> tuple[Image.Image, dict]:
    """Paint the background a description asks for; returns it and its latent attributes."""
    bg = parse_description(desc)
    rng = np.random.default_rng([seed, 7])
    top, bottom = (np.array(c, dtype=np.float32) for c in _SCENE_BASE[bg.scene])
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    arr = np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3)).copy()
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    _pattern(d, bg.scene, size, rng)
    n_props = {"minimal": 0, "some": 3, "busy": 10}[bg.clutter]
    for _ in range(n_props):
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.04, 0.1) * size
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x - r, y - r, x + r, y + r], fill=c)
    if bg.lighting == "soft":  # a visible softening at the models' size (3 px at 112), not a sub-pixel blur
        img = img.filter(ImageFilter.GaussianBlur(radius=max(1.0, size / 40)))
    arr = _apply_lighting(_apply_palette(np.asarray(img, dtype=np.float32), bg.palette), bg.lighting)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), bg.as_dict()


def _luma(arr: np.ndarray) -> np.ndarray:
    return arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114


class ProceduralRenderer:
    """CPU renderer of the simulated market; same ``render`` interface as ``DiffusersRenderer``."""

    kind = "procedural"

    def __init__(self, image_size: int = 96, product_fill: float = 0.78):
        self.image_size = image_size
        self.product_fill = product_fill

    def render(self, products: list[Image.Image], descriptions: list[str], seeds: list[int]) -> list[RenderedAd]:
        if not len(products) == len(descriptions) == len(seeds):
            raise ValueError(
                f"render: products, descriptions and seeds must have one entry each "
                f"(got {len(products)}, {len(descriptions)}, {len(seeds)})"
            )
        out = []
        for product, desc, seed in zip(products, descriptions, seeds):
            placed = place_product(product, self.image_size, self.product_fill)
            background, latent = render_background(desc, self.image_size, int(seed))
            ad = paste_product(background, placed)
            alpha = np.asarray(placed.getchannel("A")) > 127
            lum = _luma(np.asarray(ad, dtype=np.float32))
            latent["contrast"] = float(abs(lum[alpha].mean() - lum[~alpha].mean()) / 255.0)
            out.append(RenderedAd(image=ad, description=desc, seed=int(seed), latent=latent))
        return out
