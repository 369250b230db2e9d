"""The prompt model's e-commerce pretraining data (CAIG's three tasks), built from the catalog and
the click logs:

1. ``describe``: a historical ad -> a description of its background;
2. ``from_info``: the product image and its title/attributes -> the background of its best-CTR ad;
3. ``rewrite``: the product, the PM instruction and a weaker ad's description -> the best one.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from PIL import Image

from caig_ray.data import Product
from caig_ray.prompts import format_attributes, pm_instruction, template_index


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def pretraining_examples(products: list[Product], logs, ad_image, product_image, seed: int = 0,
                         n_templates: int = 1) -> list[dict]:
    """TRL prompt/completion examples with ``images``. ``ad_image(row)`` and ``product_image(product)``
    return PIL images at the PM's input size. Needs a ``description`` column in the logs. The rewrite
    task's instruction is one of the first ``n_templates`` PM templates, drawn per product (seeded)."""
    if "description" not in logs.column_names:
        raise ValueError("click logs have no 'description' column: the pretraining tasks need the "
                         "background descriptions of historical ads")
    rng = np.random.default_rng([seed, 41])
    cols = {c: logs.column(c).to_pylist() for c in ("product_id", "description", "impressions", "clicks")}
    rows_of: dict[str, list[int]] = defaultdict(list)
    for r, pid in enumerate(cols["product_id"]):
        rows_of[pid].append(r)
    ctr = lambda r: cols["clicks"][r] / max(1, cols["impressions"][r])  # noqa: E731
    out = []
    for product in products:
        rows = rows_of.get(product.id, [])
        if not rows:
            continue
        best = max(rows, key=ctr)
        img: Image.Image = product_image(product)
        r = int(rng.choice(rows))
        out.append({"task": "describe", "images": [ad_image(r)],
                    "prompt": _user("Describe the background of this advertising image."),
                    "completion": _assistant(cols["description"][r])})
        info = f"Product: {product.title}.{format_attributes(product.attributes)} Suggest an ad background."
        out.append({"task": "from_info", "images": [img], "prompt": _user(info),
                    "completion": _assistant(cols["description"][best])})
        weaker = [x for x in rows if x != best]
        if weaker:
            w = int(rng.choice(weaker))
            template = template_index(seed, product.id, n_templates)
            text = pm_instruction(product.title, product.attributes, template) + " Improve this one: " + cols["description"][w]
            out.append({"task": "rewrite", "images": [img], "prompt": _user(text),
                        "completion": _assistant(cols["description"][best])})
    return out
