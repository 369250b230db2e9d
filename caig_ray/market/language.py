"""The market's description language: free text in which scene, palette, lighting and clutter
words matter and every other word is ignored.

``parse_description`` is what both the procedural renderer and the click model read, so a
description means the same thing to the pixels and to the (hidden) users.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

# canonical value -> words that mean it (the canonical word itself included)
SCENE_WORDS: dict[str, tuple[str, ...]] = {
    "stadium": ("stadium", "arena", "field"),
    "street": ("street", "city", "urban"),
    "studio": ("studio", "backdrop"),
    "vanity": ("vanity", "dresser", "mirror"),
    "marble": ("marble", "stone"),
    "desk": ("desk", "workspace", "office"),
    "kitchen": ("kitchen", "countertop"),
    "beach": ("beach", "seaside", "ocean"),
    "playroom": ("playroom", "playground", "nursery"),
    "neon": ("neon", "nightclub", "cyberpunk"),
}
PALETTE_WORDS: dict[str, tuple[str, ...]] = {
    "vivid": ("vivid", "colorful", "saturated"),
    "pastel": ("pastel", "soft-colored"),
    "neutral": ("neutral", "beige", "grey"),
    "dark": ("dark", "black", "moody"),
    "warm": ("warm", "golden", "orange"),
    "cool": ("cool", "blue", "icy"),
}
LIGHTING_WORDS: dict[str, tuple[str, ...]] = {
    "bright": ("bright", "sunny", "sunlit"),
    "soft": ("soft", "diffuse", "gentle"),
    "dim": ("dim", "shadowy", "night"),
    "dramatic": ("dramatic", "spotlight", "contrasty"),
}
CLUTTER_WORDS: dict[str, tuple[str, ...]] = {
    "minimal": ("minimal", "clean", "simple"),
    "some": ("props", "decorated", "styled"),
    "busy": ("busy", "cluttered", "crowded"),
}
ATTRIBUTES = {
    "scene": SCENE_WORDS,
    "palette": PALETTE_WORDS,
    "lighting": LIGHTING_WORDS,
    "clutter": CLUTTER_WORDS,
}
# Values when a description says nothing about an attribute. "plain" is no scene at all.
DEFAULTS = {"scene": "plain", "palette": "neutral", "lighting": "soft", "clutter": "minimal"}

_LOOKUP: dict[str, tuple[str, str]] = {
    word: (attr, value) for attr, table in ATTRIBUTES.items() for value, words in table.items() for word in words
}
_TOKEN = re.compile(r"[a-z][a-z\-]*")


@dataclass(frozen=True)
class Background:
    """The latent background attributes a description asks for."""

    scene: str = DEFAULTS["scene"]
    palette: str = DEFAULTS["palette"]
    lighting: str = DEFAULTS["lighting"]
    clutter: str = DEFAULTS["clutter"]

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def parse_description(text: str) -> Background:
    """First word that names a value wins for each attribute; unknown words are ignored."""
    found: dict[str, str] = {}
    for tok in _TOKEN.findall(text.lower()):
        hit = _LOOKUP.get(tok)
        if hit and hit[0] not in found:
            found[hit[0]] = hit[1]
    return Background(**found)


def scene_words_in(text: str) -> int:
    """How many scene words a description contains (pretraining measures this)."""
    return sum(1 for tok in _TOKEN.findall(text.lower()) if _LOOKUP.get(tok, ("",))[0] == "scene")


_TEMPLATES = (
    "a {lighting} {scene} background with {palette} tones and {clutter} styling",
    "{palette} {scene} scene, {lighting} light, {clutter} composition",
    "product on a {clutter} {scene} set, {palette} colors, {lighting} lighting",
    "{lighting} {palette} {scene}, {clutter}",
)


def describe(bg: Background, rng) -> str:
    """A natural-looking description of ``bg`` using a random synonym for each value."""
    words = {}
    for attr, table in ATTRIBUTES.items():
        value = getattr(bg, attr)
        words[attr] = rng.choice(table[value]) if value in table else "plain"
    return _TEMPLATES[int(rng.integers(len(_TEMPLATES)))].format(**words)


def vocabulary() -> list[str]:
    """Every word the language knows (used to train the tiny tokenizer)."""
    return sorted(_LOOKUP)
