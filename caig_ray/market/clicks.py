"""The hidden click model, the historical creatives and click logs it generates, and the oracles.

The RM and the policy never see any of this: they see pixels and product text only.

logit(CTR) = base_logit + category_bias[cat]
           + (match_bonus if scene suits cat else -mismatch_penalty if scene != "plain" else 0)
           + attention_bonus[scene] + palette_effect[palette] + category_palette[cat][palette]
           + tier_effect[tier][palette] + tier_effect[tier][lighting] + tier_effect[tier][clutter]
           + lighting_effect[lighting] + clutter_effect[clutter] + contrast_weight * contrast
           + noise_std * z(seed, description)

where ``tier`` is the product's tier as its title names it (``tier_of``): text, not pixels.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from caig_ray.config import MarketConfig
from caig_ray.data.catalog import Product
from caig_ray.imaging import png_bytes
from caig_ray.market.language import (
    CLUTTER_WORDS, LIGHTING_WORDS, PALETTE_WORDS, SCENE_WORDS, Background, describe,
)
from caig_ray.market.render import ProceduralRenderer
from caig_ray.pairs import band_pairs


class ClickModel:
    """The market's users. ``true_ctr`` is an oracle: evaluation only."""

    def __init__(self, cfg: MarketConfig):
        self.cfg = cfg
        self._tier_words = {w: tier for tier, words in cfg.tiers.items() for w in words}

    def tier_of(self, title: str) -> str | None:
        """The tier a product's title names (its first tier word), None when it names none."""
        for tok in re.findall(r"[a-z]+", title.lower()):
            if tok in self._tier_words:
                return self._tier_words[tok]
        return None

    def match(self, category: str, scene: str) -> bool:
        """The product-background match oracle: the scene suits the category."""
        return scene in self.cfg.compatible_scenes.get(category, [])

    def logit(self, category: str, latent: dict, noise_key: int = 0, title: str = "") -> float:
        c = self.cfg
        tier = c.tier_effect.get(self.tier_of(title) or "", {})
        scene, palette = latent["scene"], latent["palette"]
        fit = c.match_bonus if self.match(category, scene) else (0.0 if scene == "plain" else -c.mismatch_penalty)
        z = np.random.default_rng([abs(int(noise_key)), 11]).standard_normal()
        return float(
            c.base_logit + c.category_bias.get(category, 0.0) + fit
            + c.attention_bonus.get(scene, 0.0)
            + c.palette_effect.get(palette, 0.0) + c.category_palette.get(category, {}).get(palette, 0.0)
            + sum(tier.get(latent[k], 0.0) for k in ("palette", "lighting", "clutter"))
            + c.lighting_effect.get(latent["lighting"], 0.0) + c.clutter_effect.get(latent["clutter"], 0.0)
            + c.contrast_weight * float(latent.get("contrast", 0.0))
            + c.noise_std * z
        )

    def true_ctr(self, category: str, latent: dict, noise_key: int = 0, title: str = "") -> float:
        return float(1.0 / (1.0 + np.exp(-self.logit(category, latent, noise_key, title))))


def noise_key(description: str, seed: int) -> int:
    """The hidden per-creative noise is a fixed function of what was rendered."""
    return zlib.crc32(description.encode()) ^ (int(seed) & 0xFFFFFFFF)


@dataclass
class History:
    """Historical creatives: ``logs`` are what a user has (click-log rows); ``truth`` is the
    oracle side (true CTR, match, latent attributes), one row per creative, same order."""

    logs: list[dict]
    truth: list[dict]


def make_history(products: list[Product], cfg: MarketConfig, progress: bool = True) -> History:
    """Creatives designed by (simulated) designers, shown to the market, clicks ~ Binomial."""
    renderer = ProceduralRenderer(cfg.ad_image_size, cfg.product_fill)
    model = ClickModel(cfg)
    scenes = list(SCENE_WORDS)
    logs, truth = [], []
    for p_idx, product in enumerate(tqdm(products, desc="history", disable=not progress)):
        rng = np.random.default_rng([cfg.seed, 2, p_idx])
        n = int(rng.integers(cfg.creatives_per_product[0], cfg.creatives_per_product[1] + 1))
        compatible = cfg.compatible_scenes[product.category]
        for k in range(n):
            scene = str(rng.choice(compatible)) if rng.random() < cfg.designer_match_rate else str(rng.choice(scenes))
            bg = Background(
                scene=scene,
                palette=str(rng.choice(list(PALETTE_WORDS))),
                lighting=str(rng.choice(list(LIGHTING_WORDS))),
                clutter=str(rng.choice(list(CLUTTER_WORDS))),
            )
            desc = describe(bg, rng)
            seed = int(rng.integers(0, 2**31 - 1))
            ad = renderer.render([product.image], [desc], [seed])[0]
            ctr = model.true_ctr(product.category, ad.latent, noise_key(desc, seed), product.title)
            lo, hi = np.log(cfg.impressions[0]), np.log(cfg.impressions[1])
            imp = int(np.exp(rng.uniform(lo, hi)))
            clicks = int(rng.binomial(imp, ctr))
            cid = f"{product.id}-c{k:02d}"
            logs.append({
                "product_id": product.id, "creative_id": cid, "image": png_bytes(ad.image),
                "impressions": imp, "clicks": clicks, "title": product.title,
                "category": product.category, "description": desc,
            })
            truth.append({
                "creative_id": cid, "product_id": product.id, "category": product.category,
                "true_ctr": ctr, "match": model.match(product.category, ad.latent["scene"]),
                "tier": model.tier_of(product.title) or "", "seed": seed, **ad.latent,
            })
    return History(logs=logs, truth=truth)


def bayes_ceiling(history: History, cfg: MarketConfig) -> dict:
    """Best pairwise accuracy any RM can reach against the logged order on the band pairs:
    how often the true-CTR order agrees with the logged order (computed, not assumed)."""
    pairs = band_pairs(
        [r["product_id"] for r in history.logs], [r["impressions"] for r in history.logs],
        [r["clicks"] for r in history.logs], cfg.min_impressions, tuple(cfg.band),
    )
    true = np.array([t["true_ctr"] for t in history.truth])
    agree = [true[hi] > true[lo] for hi, lo in pairs]
    return {
        "bayes_ceiling": float(np.mean(agree)) if agree else float("nan"),
        "n_band_pairs": len(pairs),
        "band": list(cfg.band),
        "min_impressions": cfg.min_impressions,
    }
