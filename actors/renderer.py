"""``Renderer`` and ``CandidateRenderer``: Ray Data ``map_batches`` callable classes around either renderer.

The model is loaded once in ``__init__`` (from paths in the config, so a restarted actor reloads
it); run it with ``compute=ActorPoolStrategy(min_size=..., max_size=...)`` so the pool grows with
the backlog. One class per row type (caig_ray/rows.py), so neither decides by what a block holds:

- ``Renderer``, candidate pairs (the online loop: a block of ``CandidatePair.SCHEMA`` columns):
  the product at ``image_ref``, ``desc_a``, ``desc_b``, ``seed`` -> adds ``left_image`` / ``right_image``
  (ad of a / ad of b, the same seed for both, as CAIG renders them), ``latent_a`` / ``latent_b`` (what
  the procedural renderer painted, JSON; "" from a diffusion model), ``render_s``, ``renderer_pid``;
- ``CandidateRenderer``, ``generate``'s ``ProductCandidates`` (a pyarrow block): ``image_path`` /
  ``image_bytes``, ``descriptions`` (N), ``seed`` -> ``ads`` (N PNGs, one seed for all, as CAIG
  renders the candidates of a product).
"""

from __future__ import annotations

import dataclasses
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
from caig_ray.rows import ProductCandidates


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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The online loop's block of ``CandidatePair`` columns: both ads of each pair, same seed."""
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


class CandidateRenderer(Renderer):
    """``generate``'s renderer stage: a block of ``ProductCandidates`` -> the same rows with ``ads``,
    the N ads of each product in one list, all painted with the product's seed."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = ProductCandidates.from_table(batch)
        products, descriptions, seeds, owner = [], [], [], []
        for i, r in enumerate(rows):
            image = product_image(r.image_path, r.image_bytes, f"product {r.id!r}")
            for d in r.descriptions:
                products.append(image)
                descriptions.append(d)
                seeds.append(r.seed)
                owner.append(i)
        ads, _ = self._render(products, descriptions, seeds)
        out = [dataclasses.replace(r, ads=[]) for r in rows]
        for i, ad in zip(owner, ads):
            out[i].ads.append(bytes(ad))
        self._simulated_latency(len(products))
        self.fault.tick()
        return ProductCandidates.table(out)
