"""``make-world``: the embedded default's world in one folder -- catalog, click logs, the market's
oracle tables and the tiny model folders -- written so users' readers and loaders read it back."""

from __future__ import annotations

import json
import time
from pathlib import Path

from caig_ray.config import CaigConfig, save_config


class WorldLayout:
    """Where everything lives inside a world folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.catalog = self.root / "catalog" / "catalog.json"
        self.click_logs = self.root / "click_logs.parquet"
        self.truth = self.root / "market_truth.parquet"
        self.market = self.root / "market.json"
        self.perception = self.root / "perception.json"
        self.config = self.root / "config.yaml"
        self.policy = self.root / "models" / "policy"
        self.reward = self.root / "models" / "reward_init"
        self.sd = self.root / "models" / "sd"
        self.controlnet = self.root / "models" / "controlnet"


def _same_tower(cfg: CaigConfig) -> bool:
    """The tiny RM's tower has the PM's shape, so it can start from the pretrained one too."""
    keys = ("vision_depth", "vision_embed_dim", "vision_patch_size", "hidden_size")
    return all(getattr(cfg.policy.tiny, k) == getattr(cfg.reward.tiny, k) for k in keys)


def make_world(cfg: CaigConfig, out: str | Path, models: bool = True, progress: bool = True) -> dict:
    """Write the world for ``cfg`` under ``out``; returns a summary with timings (seconds)."""
    from caig_ray.data import read_catalog, read_click_logs, write_catalog, write_click_logs
    from caig_ray.market import bayes_ceiling, make_catalog, make_history  # imported here: WorldLayout stays light

    lay = WorldLayout(out)
    lay.root.mkdir(parents=True, exist_ok=True)
    times, perception = {}, None
    t = time.perf_counter()
    m = cfg.market
    products = make_catalog(m.categories, m.n_products, m.product_image_size, m.seed, m.tiers)
    write_catalog(products, lay.catalog)
    times["catalog_s"] = time.perf_counter() - t

    t = time.perf_counter()
    history = make_history(products, m, progress=progress)
    write_click_logs(history.logs, lay.click_logs)
    write_click_logs(history.truth, lay.truth)
    ceiling = bayes_ceiling(history, m)
    times["history_s"] = time.perf_counter() - t

    if models:
        t = time.perf_counter()
        from caig_ray.models.policy import make_tiny_policy
        from caig_ray.models.renderer import make_tiny_sd
        from caig_ray.models.reward import make_tiny_reward
        from caig_ray.market.corpus import market_corpus

        corpus = market_corpus()
        make_tiny_policy(cfg.policy.tiny, lay.policy, corpus)
        make_tiny_reward(cfg.reward.tiny, lay.reward, cfg.reward.pair_image_size, corpus)
        make_tiny_sd(lay.sd, lay.controlnet, corpus, seed=cfg.seed)
        times["models_s"] = time.perf_counter() - t
        if cfg.perception.train_renders:
            from caig_ray.perception import pretrain_tower

            t = time.perf_counter()
            perception = pretrain_tower(
                lay.policy, products, m.categories, cfg.perception, m, cfg.policy.image_size or cfg.policy.tiny.image_size,
                also=[lay.reward] if _same_tower(cfg) else [], progress=progress)
            lay.perception.write_text(json.dumps(perception, indent=1))
            times["perception_s"] = time.perf_counter() - t

    # Read everything back through the users' readers: a world that does not load is not written.
    t = time.perf_counter()
    n_products = len(read_catalog(lay.catalog))
    n_creatives = read_click_logs(lay.click_logs).num_rows
    times["verify_s"] = time.perf_counter() - t

    save_config(cfg, lay.config)
    summary = {
        "n_products": n_products, "n_creatives": n_creatives,
        "mean_true_ctr": sum(r["true_ctr"] for r in history.truth) / len(history.truth),
        "history_match_rate": sum(r["match"] for r in history.truth) / len(history.truth),
        **ceiling, "times": times,
    }
    if perception is not None:
        summary["perception"] = {k: perception[k] for k in (
            "probe_accuracy_before", "probe_accuracy", "probe_majority_rate", "train_renders", "image_size")}
    lay.market.write_text(json.dumps(summary, indent=1))
    return summary
