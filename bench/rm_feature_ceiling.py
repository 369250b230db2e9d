"""How far could a *perfect perceiver* get on the RM's pairs? (is the reward-model bar reachable?)

    python bench/rm_feature_ceiling.py --world runs/demo/world [--preset demo]

The RM must read, from pixels and the title, what drives clicks. This bench hands a pairwise
logistic model the market's hidden rendered attributes themselves (category x scene,
category x palette, lighting, clutter, contrast -- every input of the click model but its noise)
and trains it on the same training pairs ``train-rm`` uses; it is evaluated on the same held-out
band pairs as ``evaluate-rm``, against the logged and the true order, beside the Bayes ceiling.
The gap between it and the ceiling is what the data size (not perception) costs; the gap between
it and the RM is what perception costs. Writes bench/results/rm_feature_ceiling.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from caig_ray.config import load_config
from caig_ray.data import read_click_logs
from caig_ray.market.language import CLUTTER_WORDS, LIGHTING_WORDS, PALETTE_WORDS, SCENE_WORDS
from caig_ray.pairs import mine_rm_pairs
from caig_ray.world import WorldLayout


def features(truth: list[dict], categories: list[str]) -> np.ndarray:
    scenes, palettes = ["plain", *SCENE_WORDS], list(PALETTE_WORDS)
    lights, clutter = list(LIGHTING_WORDS), list(CLUTTER_WORDS)
    dims = len(categories) * (len(scenes) + len(palettes)) + len(lights) + len(clutter) + 1
    x = np.zeros((len(truth), dims), dtype=np.float32)
    for i, t in enumerate(truth):
        c = categories.index(t["category"])
        x[i, c * len(scenes) + scenes.index(t["scene"])] = 1
        off = len(categories) * len(scenes)
        x[i, off + c * len(palettes) + palettes.index(t["palette"])] = 1
        off += len(categories) * len(palettes)
        x[i, off + lights.index(t["lighting"])] = 1
        x[i, off + len(lights) + clutter.index(t["clutter"])] = 1
        x[i, -1] = t["contrast"]
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True)
    p.add_argument("--preset", default="demo")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "rm_feature_ceiling.json"))
    args = p.parse_args()
    cfg = load_config(args.preset)
    lay = WorldLayout(args.world)
    logs = read_click_logs(lay.click_logs)
    truth = pq.read_table(lay.truth).to_pylist()
    x = torch.tensor(features(truth, cfg.market.categories))
    tc = cfg.train_rm
    test = [q for q in mine_rm_pairs(logs, cfg.market.min_impressions, tuple(cfg.market.band), tc.test_fraction,
                                     tc.seed) if q["split"] == "test"]
    result = {"n_test_pairs": len(test)}
    logged = np.array([q["label"] for q in test])
    true = np.array([int(truth[q["left_row"]]["true_ctr"] < truth[q["right_row"]]["true_ctr"]) for q in test])
    result["bayes_ceiling"] = float((true == logged).mean())
    for name, band in (("train_band", tuple(tc.train_band or cfg.market.band)), ("market_band", tuple(cfg.market.band))):
        train = [q for q in mine_rm_pairs(logs, cfg.market.min_impressions, band, tc.test_fraction, tc.seed)
                 if q["split"] == "train"]
        d = x[[q["left_row"] for q in train]] - x[[q["right_row"] for q in train]]
        y = torch.tensor([1.0 - q["label"] for q in train])  # 1 = left has the higher logged CTR
        w = torch.zeros(x.shape[1], requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=500)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(d @ w, y) + 1e-3 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        dt = x[[q["left_row"] for q in test]] - x[[q["right_row"] for q in test]]
        pred = (dt @ w.detach() < 0).numpy().astype(int)  # 1 = right better
        result[f"features_{name}"] = {"n_train_pairs": len(train), "accuracy_logged": float((pred == logged).mean()),
                                      "accuracy_true": float((pred == true).mean())}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
