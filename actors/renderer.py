"""``Renderer``: a Ray Data ``map_batches`` callable class around either renderer.

The model is loaded once in ``__init__`` (from paths in the config, so a restarted actor reloads
it); run it with ``compute=ActorPoolStrategy(min_size=..., max_size=...)`` so the pool grows with
the backlog. Two input shapes:

- candidate pairs (the online loop: a block of ``caig_ray.rows.CandidatePair.SCHEMA`` columns):
  the product at ``image_ref``, ``desc_a``, ``desc_b``, ``seed`` -> adds ``left_image`` / ``right_image``
  (ad of a / ad of b, the same seed for both, as CAIG renders them), ``latent_a`` / ``latent_b`` (what
  the procedural renderer painted, JSON; "" from a diffusion model), ``render_s``, ``renderer_pid``;
- ``generate``'s products (a pyarrow batch): ``image_path``/``image_bytes``, ``descriptions`` (N),
  ``seed`` -> ``ads`` (N PNGs, one seed for all, as CAIG renders the candidates of a product).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa

from caig_ray.config import FaultConfig, RendererConfig
from caig_ray.data.catalog import load_product_image, product_image
from caig_ray.faults import BatchFault
from caig_ray.imaging import png_bytes
from caig_ray.models.renderer import make_renderer


class Renderer:
    def __init__(self, cfg: RendererConfig, fault: FaultConfig | None = None, device: str = "cpu",
                 dtype: str = "float32"):
        self.renderer = make_renderer(cfg, device, dtype)
        self.latency_s = cfg.simulated_latency_s
        self.fault = BatchFault.of(fault, "renderer", "renderer_die_after_batches")

    def _render(self, products, descriptions, seeds) -> tuple[np.ndarray, np.ndarray]:
        ads = self.renderer.render(products, [str(d) for d in descriptions], [int(s) for s in seeds])
        images = np.array([png_bytes(a.image) for a in ads], dtype=object)
        latents = np.array([json.dumps(a.latent) if a.latent else "" for a in ads], dtype=object)
        return images, latents

    def __call__(self, batch: dict[str, np.ndarray] | pa.Table) -> dict[str, np.ndarray] | pa.Table:
        if isinstance(batch, pa.Table):
            return self._render_candidates(batch)
        t0 = time.perf_counter()
        # the rows say where the product image is (the driver never holds it)
        products = [load_product_image(str(ref)) for ref in batch["image_ref"]]
        batch["left_image"], batch["latent_a"] = self._render(products, batch["desc_a"], batch["seed"])
        batch["right_image"], batch["latent_b"] = self._render(products, batch["desc_b"], batch["seed"])
        n = len(products)
        self._simulated_latency(2 * n)
        # for the busy-fraction measurement (bench/pipeline.py): this batch's render time (a simulated
        # latency included), once per batch
        batch["render_s"] = np.array([time.perf_counter() - t0] + [0.0] * (n - 1))
        batch["renderer_pid"] = np.array([os.getpid()] * n)
        self.fault.tick()
        return batch

    def _simulated_latency(self, images: int) -> None:
        if self.latency_s:  # renderer.simulated_latency_s: a remote GPU's render time (bench/pipeline.py)
            time.sleep(self.latency_s * images)

    def _render_candidates(self, batch: pa.Table) -> pa.Table:
        """``generate``'s rows: one product (``image_path`` / ``image_bytes``, ``seed``) with its N
        ``descriptions`` -> ``ads``, the N ads in one list, all painted with the product's seed."""
        rows = batch.to_pylist()
        products, descriptions, seeds, owner = [], [], [], []
        for i, r in enumerate(rows):
            image = product_image(r["image_path"], r["image_bytes"], f"product {r['id']!r}")
            for d in r["descriptions"]:
                products.append(image)
                descriptions.append(d)
                seeds.append(r["seed"])
                owner.append(i)
            r["ads"] = []
        ads, _ = self._render(products, descriptions, seeds)
        for i, ad in zip(owner, ads):
            rows[i]["ads"].append(bytes(ad))
        self._simulated_latency(len(products))
        self.fault.tick()
        return pa.Table.from_pylist(rows)
