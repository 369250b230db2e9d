"""Instruction templates (CAIG's prompt-model and reward-model questions) and prompt cleaning."""

from __future__ import annotations

import re

PM_TEMPLATES = (
    "Design a concise Stable Diffusion prompt that takes the product caption '{title}' and product image as "
    "inspiration to generate an appealing advertising background.",
    "Write a background description for an ad of '{title}' that makes people click.",
    "Describe a scene, colors and lighting for an advertising image of '{title}'.",
)
RM_TEMPLATES = (
    "Comparing the left part and right part of this image, which will bring more click-through rate for the "
    "product '{title}'?",
    "Which side of this image is the better ad for '{title}', left or right?",
)


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
