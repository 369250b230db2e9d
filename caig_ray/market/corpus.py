"""The market's own text: the words, titles and instructions the embedded world's tiny tokenizers are
trained on (no hub download). The model factories take it as an argument; only the world's builder
(``caig_ray/world.py``) and the test factories read it from here."""

from __future__ import annotations

from caig_ray.market.catalog import _ADJ, _NOUNS
from caig_ray.market.language import _TEMPLATES, vocabulary
from caig_ray.prompts import PM_TEMPLATES, RM_TEMPLATES


def market_corpus() -> list[str]:
    """Text the tiny tokenizers are trained on: the market's words, titles and instructions."""
    words = vocabulary() + _ADJ + [n for ns in _NOUNS.values() for n in ns]
    lines = [" ".join(words), " ".join(w.capitalize() for w in words)]
    lines += [t.format(title="a product") for t in PM_TEMPLATES + RM_TEMPLATES]
    lines += [t.replace("{", "").replace("}", "") for t in _TEMPLATES]
    lines += ["left right Attributes: color category , . ' : ! ? 0 1 2 3 4 5 6 7 8 9 background scene"]
    return lines * 3
