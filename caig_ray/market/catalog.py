"""Procedural product catalog: RGBA product images whose category is visible in the pixels."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from caig_ray.data.catalog import Product

_COLORS = {
    "red": (200, 30, 40), "blue": (30, 70, 200), "green": (40, 150, 60), "black": (25, 25, 30),
    "white": (235, 235, 235), "pink": (235, 120, 170), "gold": (210, 170, 60), "silver": (170, 175, 185),
    "orange": (240, 130, 30), "purple": (130, 60, 170), "yellow": (240, 210, 40),
}
_NOUNS = {
    "sneakers": ["running sneakers", "canvas sneakers", "basketball shoes", "trail runners"],
    "cosmetics": ["matte lipstick", "lip gloss", "velvet lipstick", "lip tint"],
    "electronics": ["smartphone", "tablet", "e-reader", "handheld console"],
    "kitchen": ["stock pot", "saucepan", "casserole pot", "steamer pot"],
    "toys": ["teddy bear", "plush bear", "cuddly bear", "toy bear"],
}
# title words the default tiers use (MarketConfig.tiers) and v1's adjectives: the tokenizer's corpus
_ADJ = ["classic", "premium", "lightweight", "new", "everyday", "deluxe", "compact", "limited edition",
        "luxury", "designer", "budget", "value", "basic"]


def _shoe(d: ImageDraw.ImageDraw, s: int, c, rng) -> None:
    d.rectangle([0.12 * s, 0.62 * s, 0.9 * s, 0.72 * s], fill=(245, 245, 245, 255))
    d.polygon([(0.14 * s, 0.62 * s), (0.2 * s, 0.38 * s), (0.45 * s, 0.32 * s), (0.6 * s, 0.45 * s),
               (0.88 * s, 0.52 * s), (0.9 * s, 0.62 * s)], fill=c + (255,))
    for i in range(3):
        x = (0.32 + 0.07 * i) * s
        d.line([x, 0.38 * s, x + 0.05 * s, 0.46 * s], fill=(250, 250, 250, 255), width=max(1, s // 48))


def _lipstick(d, s, c, rng) -> None:
    case = _COLORS["gold"] if rng.random() < 0.5 else _COLORS["black"]
    d.rectangle([0.4 * s, 0.5 * s, 0.6 * s, 0.9 * s], fill=case + (255,))
    d.rectangle([0.43 * s, 0.3 * s, 0.57 * s, 0.5 * s], fill=c + (255,))
    d.polygon([(0.43 * s, 0.3 * s), (0.57 * s, 0.3 * s), (0.57 * s, 0.14 * s)], fill=c + (255,))


def _phone(d, s, c, rng) -> None:
    d.rounded_rectangle([0.3 * s, 0.1 * s, 0.7 * s, 0.9 * s], radius=s // 12, fill=(30, 30, 35, 255))
    d.rectangle([0.34 * s, 0.17 * s, 0.66 * s, 0.8 * s], fill=tuple(min(255, v + 60) for v in c) + (255,))
    d.ellipse([0.47 * s, 0.82 * s, 0.53 * s, 0.87 * s], fill=(120, 120, 120, 255))


def _pot(d, s, c, rng) -> None:
    d.rectangle([0.22 * s, 0.4 * s, 0.78 * s, 0.82 * s], fill=_COLORS["silver"] + (255,))
    d.ellipse([0.22 * s, 0.74 * s, 0.78 * s, 0.9 * s], fill=_COLORS["silver"] + (255,))
    d.ellipse([0.2 * s, 0.32 * s, 0.8 * s, 0.48 * s], fill=c + (255,))
    d.rectangle([0.08 * s, 0.48 * s, 0.22 * s, 0.54 * s], fill=(40, 40, 40, 255))
    d.rectangle([0.78 * s, 0.48 * s, 0.92 * s, 0.54 * s], fill=(40, 40, 40, 255))
    d.ellipse([0.45 * s, 0.26 * s, 0.55 * s, 0.34 * s], fill=(40, 40, 40, 255))


def _bear(d, s, c, rng) -> None:
    d.ellipse([0.25 * s, 0.45 * s, 0.75 * s, 0.92 * s], fill=c + (255,))
    d.ellipse([0.3 * s, 0.12 * s, 0.7 * s, 0.5 * s], fill=c + (255,))
    d.ellipse([0.26 * s, 0.08 * s, 0.4 * s, 0.22 * s], fill=c + (255,))
    d.ellipse([0.6 * s, 0.08 * s, 0.74 * s, 0.22 * s], fill=c + (255,))
    d.ellipse([0.4 * s, 0.25 * s, 0.45 * s, 0.3 * s], fill=(10, 10, 10, 255))
    d.ellipse([0.55 * s, 0.25 * s, 0.6 * s, 0.3 * s], fill=(10, 10, 10, 255))


_DRAW = {"sneakers": _shoe, "cosmetics": _lipstick, "electronics": _phone, "kitchen": _pot, "toys": _bear}
_PALETTE = {
    "sneakers": ["red", "blue", "black", "white", "green", "orange"],
    "cosmetics": ["red", "pink", "purple"],
    "electronics": ["blue", "silver", "black", "green"],
    "kitchen": ["red", "black", "orange", "green"],
    "toys": ["orange", "yellow", "pink", "purple"],
}


def draw_product(category: str, rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """Draw one product of ``category`` on a transparent canvas; returns (RGBA image, colour)."""
    if category not in _DRAW:
        raise ValueError(f"no drawing for category {category!r}; known: {sorted(_DRAW)}")
    colour = str(rng.choice(_PALETTE[category]))
    base = np.array(_COLORS[colour]) + rng.integers(-15, 16, size=3)
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    _DRAW[category](ImageDraw.Draw(img), size, tuple(int(v) for v in np.clip(base, 0, 255)), rng)
    return img, colour


def make_catalog(categories: list[str], n_products: int, size: int, seed: int,
                 tiers: dict[str, list[str]] | None = None) -> list[Product]:
    """``n_products`` products spread evenly over ``categories``; seeded and reproducible. With
    ``tiers`` (tier -> title words) each product draws a tier, named by one of its words at the start
    of the title and in the attributes -- drawn apart from the image, so only the text tells it."""
    products = []
    for i in range(n_products):
        rng = np.random.default_rng([seed, 1, i])
        cat = categories[i % len(categories)]
        image, colour = draw_product(cat, rng, size)
        attrs = {"color": colour, "category": cat}
        if tiers:
            tier = str(rng.choice(sorted(tiers)))
            adjective = str(rng.choice(tiers[tier]))
            attrs["tier"] = tier
        else:
            adjective = str(rng.choice(_ADJ))
        title = f"{adjective} {colour} {rng.choice(_NOUNS.get(cat, [cat]))}"
        products.append(Product(id=f"p{i:06d}", title=title, image=image, category=cat, attributes=attrs))
    return products
