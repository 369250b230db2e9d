"""Product-centric preference negatives (PCPO, CAIG): per example a seeded coin flip between
(a) the same instruction and chosen description with the product image's 32×32 patches 75% zeroed,
and (b) the current image with another product's instruction and chosen description.

As CAIG does it, the mask is cut from the product image at its native resolution, before the
processor's resize: 32-px patches of the image as stored, not of the model's input."""

from __future__ import annotations

import numpy as np
from PIL import Image


def mask_patches(image: Image.Image, rng: np.random.Generator, frac: float = 0.75, patch: int = 32) -> Image.Image:
    """Zero ``frac`` of the image's ``patch``×``patch`` patches (chosen by ``rng``)."""
    arr = np.array(image.convert("RGB"))
    gh, gw = -(-arr.shape[0] // patch), -(-arr.shape[1] // patch)
    n = gh * gw
    for k in rng.permutation(n)[: int(round(frac * n))]:
        r, c = divmod(int(k), gw)
        arr[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = 0
    return Image.fromarray(arr)


def pcpo_negative(index: int, images: list[Image.Image], instructions: list[str], chosen: list[str],
                  rng: np.random.Generator, frac: float = 0.75, patch: int = 32,
                  native: list[Image.Image] | None = None, size: int | None = None) -> dict:
    """The PCPO negative context for example ``index`` of a batch: ``kind`` "masked_image" or
    "other_caption", the ``image`` and ``instruction`` of the negative, and the chosen description
    ``response`` it is scored with. With a one-product batch only the masked-image kind is possible.
    ``images`` are the model's inputs; ``native`` (when given) the same images as stored, which the
    mask is cut from before resizing to ``size`` (CAIG's order)."""
    if len(images) < 2 or rng.random() < 0.5:
        source = native[index] if native is not None else images[index]
        masked = mask_patches(source, rng, frac, patch)
        if size:
            masked = masked.resize((size, size))
        return {"kind": "masked_image", "image": masked,
                "instruction": instructions[index], "response": chosen[index]}
    other = int(rng.choice([j for j in range(len(images)) if j != index]))
    # CAIG's (b): the current image with another product's instruction and chosen description
    return {"kind": "other_caption", "image": images[index], "instruction": instructions[other],
            "response": chosen[other]}
