"""``Renderer``: a Ray Data ``map_batches`` callable class around either renderer.

The model is loaded once in ``__init__`` (from paths in the config, so a restarted actor reloads
it); run it with ``compute=ActorPoolStrategy(min_size=..., max_size=...)`` so the pool grows with
the backlog. Input columns: ``product_image`` (PNG bytes), ``description``, ``seed``; adds ``ad``
(PNG bytes).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from caig_ray.config import RendererConfig
from caig_ray.imaging import png_bytes
from caig_ray.models.renderer import make_renderer


class Renderer:
    def __init__(self, cfg: dict):
        self.renderer = make_renderer(RendererConfig.model_validate(cfg))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        products = [Image.open(io.BytesIO(bytes(b))) for b in batch["product_image"]]
        ads = self.renderer.render(products, [str(d) for d in batch["description"]],
                                   [int(s) for s in batch["seed"]])
        batch["ad"] = np.array([png_bytes(a.image) for a in ads], dtype=object)
        return batch
