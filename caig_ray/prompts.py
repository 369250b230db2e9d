"""Instruction templates (CAIG's prompt-model and reward-model questions) and prompt cleaning."""

from __future__ import annotations

import re

# CAIG's variety: ~10 prompt-model instructions and 12 reward-model questions, one drawn per example
# (seeded: ``template_index``). Index 0 is the fixed one used where a run must compare like with like
# (held-out evaluation, live scoring).
PM_TEMPLATES = (
    "Design a concise Stable Diffusion prompt that takes the product caption '{title}' and product image as "
    "inspiration to generate an appealing advertising background.",
    "Write a background description for an ad of '{title}' that makes people click.",
    "Describe a scene, colors and lighting for an advertising image of '{title}'.",
    "Suggest an advertising background for the product in this image, '{title}', that draws attention.",
    "Given the product image and its caption '{title}', write a short prompt for the background of its ad.",
    "Create a background prompt for an e-commerce ad of '{title}': setting, colors and light.",
    "What background would make an ad of '{title}' attractive to shoppers? Describe it briefly.",
    "Imagine a scene behind '{title}' in its ad and describe it as a Stable Diffusion prompt.",
    "Write a concise prompt describing an eye-catching background for '{title}'.",
    "For the product '{title}' shown in the image, describe the ad background: place, style and mood.",
)
RM_TEMPLATES = (
    "Comparing the left part and right part of this image, which will bring more click-through rate for the "
    "product '{title}'?",
    "Which side of this image is the better ad for '{title}', left or right?",
    "Of the two ads for '{title}', left and right, which one will more people click?",
    "Which advertising image of '{title}' gets the higher click-through rate: the left one or the right one?",
    "Two ads of the product '{title}' are shown. Which will attract more clicks, left or right?",
    "For '{title}', is the left ad or the right ad more likely to be clicked?",
    "Judge the two ads of '{title}': which one, left or right, would shoppers click more?",
    "Which background makes the ad of '{title}' more clickable, the left or the right?",
    "Compare the left and the right creative for '{title}'. Which has the higher CTR?",
    "Predict which of the two images of '{title}' brings more click-through: left or right?",
    "Left or right: which ad of '{title}' will perform better in click-through rate?",
    "Looking at both ads for the product '{title}', which one will earn more clicks, left or right?",
)


def template_index(seed: int, key: str, n_templates: int, *salt: int) -> int:
    """The template drawn for one example: a seeded function of (seed, example key, salt), so a resumed
    or recovered job draws the same one."""
    import zlib

    return zlib.crc32(f"{seed}|{key}|{'|'.join(map(str, salt))}".encode()) % n_templates


def format_attributes(attributes: dict | None) -> str:
    if not attributes:
        return ""
    return " Attributes: " + ", ".join(f"{k}: {v}" for k, v in sorted(attributes.items())) + "."


def pm_instruction(title: str, attributes: dict | None = None, template: int = 0) -> str:
    return PM_TEMPLATES[template % len(PM_TEMPLATES)].format(title=title) + format_attributes(attributes)


def rm_question(title: str, attributes: dict | None = None, template: int = 0) -> str:
    return RM_TEMPLATES[template % len(RM_TEMPLATES)].format(title=title) + format_attributes(attributes)


def clean_prompt(text: str) -> str:
    """CAIG's prompt cleaning before rendering: no quotes, newlines or periods."""
    return re.sub(r"\s+", " ", re.sub(r"[\"'\n.]", " ", text)).strip()
