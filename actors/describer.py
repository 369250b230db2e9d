"""``Describer``: the prompt model writing N background descriptions per product, as a Ray Data
``map_batches`` callable class on an actor pool (``resources.generators``; a GPU each on a cluster).

Input rows are validated catalog rows (dataplane/catalog.py: ``row``, ``id``, ``title``,
``attributes``, ``image_path`` / ``image_bytes``); each leaves as a ``ProductCandidates`` row
(caig_ray/rows.py) with ``descriptions`` and ``duplicate`` (N each) and ``seed`` = base seed +
catalog row, the seed its ads are rendered with. The policy is loaded
once per actor, from the folder: the driver never loads a model.
"""

from __future__ import annotations

import json

import pyarrow as pa

from caig_ray.config import PolicyConfig
from caig_ray.data.catalog import product_image
from caig_ray.rows import ProductCandidates


class Describer:
    def __init__(self, model_path: str, policy: PolicyConfig, n: int, seed: int, device: str = "cpu",
                 dtype: str = "float32"):
        from caig_ray.models.policy import load_policy

        self.cfg = policy
        self.model, self.processor = load_policy(model_path, dtype, device)
        self.model.eval()
        self.n, self.seed, self.device = n, seed, device

    def __call__(self, batch: pa.Table) -> pa.Table:
        from caig_ray.policy_ops import as_image, generate_descriptions
        from caig_ray.prompts import pm_instruction

        rows, bs = batch.to_pylist(), self.cfg.generate_batch_size
        out: list[ProductCandidates] = []
        for start in range(0, len(rows), bs):
            chunk = rows[start:start + bs]
            images = [as_image(product_image(r["image_path"], r["image_bytes"], f"product {r['id']!r}"),
                               self.cfg.image_size) for r in chunk]
            instructions = [pm_instruction(r["title"], json.loads(r["attributes"] or "{}")) for r in chunk]
            # sampling is seeded by the chunk's first catalog row: a product's samples depend on the
            # seed and on which products share its chunk, never on which actor ran it
            gen = generate_descriptions(self.model, self.processor, images, instructions, self.n,
                                        self.cfg.temperature, self.seed + chunk[0]["row"], self.cfg.max_new_tokens,
                                        device=self.device)
            out += [ProductCandidates.of_catalog_row(r, g["descriptions"], g["duplicate"], self.seed + r["row"])
                    for r, g in zip(chunk, gen)]
        return ProductCandidates.table(out)
