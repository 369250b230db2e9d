"""Can the RM be reward-hacked with eye-catching, mismatched scenes? (why DPO does or does not drift)

    python bench/rm_mismatch_probe.py --demo runs/demo [--products 200]

CAIG's drift needs an RM that prefers an attention-grabbing scene that does not suit the product
(a lipstick in a stadium) over a suitable one, while the market's users click it less. For each
product, and each (suitable scene, unsuitable attention scene) pair, both ads are rendered with the
same seed and palette/lighting/clutter words; the RM (position-debiased) says which wins, the market
oracle says which truly gets more clicks. Writes bench/results/rm_mismatch_probe.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from caig_ray.config import load_config
from caig_ray.data import read_catalog
from caig_ray.market.clicks import ClickModel, noise_key
from caig_ray.market.render import ProceduralRenderer
from caig_ray.world import WorldLayout


def probe(cfg, world: Path, rm: Path, n_products: int = 200) -> dict:
    """The probe on one world and RM: overall, per category and per (category, mismatched scene) cell."""
    from caig_ray.actors.scorer import RewardScorer
    from caig_ray.scoring import PairToScore

    m = cfg.market
    market, renderer = ClickModel(m), ProceduralRenderer(cfg.renderer.image_size, cfg.renderer.product_fill)
    scorer = RewardScorer(str(rm), cfg.reward.pair_image_size)
    products = read_catalog(WorldLayout(world).catalog)[:n_products]
    rng = np.random.default_rng(0)
    rows = []
    for prod in products:
        good = [s for s in m.compatible_scenes[prod.category] if s != "studio" and s not in m.attention_bonus]
        bad = [s for s in m.attention_bonus if s not in m.compatible_scenes[prod.category]]
        style = f"{rng.choice(['vivid', 'warm', 'pastel', 'neutral'])} colors, {rng.choice(['bright', 'soft'])} light, minimal"
        seed = int(rng.integers(0, 2**31 - 1))
        for g in good:
            for b in bad:
                da, db = f"{g} scene, {style}", f"{b} scene, {style}"
                ads = renderer.render([prod.image, prod.image], [da, db], [seed, seed])
                ctr = [market.true_ctr(prod.category, a.latent, noise_key(d, seed), prod.title)
                       for a, d in zip(ads, (da, db))]
                rows.append({"category": prod.category, "suitable": g, "mismatched": b, "title": prod.title,
                             "ads": (ads[0].image, ads[1].image), "true_mismatch_better": ctr[1] > ctr[0]})
    if not rows:
        return {"pairs": 0, "note": "no eye-catching scene is unsuitable for any category in this world"}
    scores = scorer.score([PairToScore(r["ads"][1], r["ads"][0], r["title"]) for r in rows])  # left = mismatched
    p_mis = np.array(scores["p_left_debiased"])
    truth = np.array([r["true_mismatch_better"] for r in rows])

    def summary(idx) -> dict:
        return {"pairs": len(idx), "rm_prefers_mismatched": float(np.mean(p_mis[idx] > 0.5)),
                "mean_p_mismatched": float(np.mean(p_mis[idx])), "truly_mismatched_better": float(np.mean(truth[idx]))}

    by_cat = {c: summary([i for i, r in enumerate(rows) if r["category"] == c]) for c in sorted({r["category"] for r in rows})}
    cells = sorted({(r["category"], r["mismatched"]) for r in rows})
    by_cell = {f"{c} x {s}": summary([i for i, r in enumerate(rows) if (r["category"], r["mismatched"]) == (c, s)])
               for c, s in cells}
    return {"pairs": len(rows), "rm_prefers_mismatched": float(np.mean(p_mis > 0.5)),
            "mean_p_mismatched": float(p_mis.mean()), "truly_mismatched_better": float(truth.mean()),
            "rm_agrees_with_market": float(np.mean((p_mis > 0.5) == truth)), "by_category": by_cat, "by_cell": by_cell}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", required=True)
    p.add_argument("--preset", default="demo")
    p.add_argument("--products", type=int, default=200)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "rm_mismatch_probe.json"))
    args = p.parse_args()
    result = probe(load_config(args.preset), Path(args.demo) / "world", Path(args.demo) / "rm", args.products)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
