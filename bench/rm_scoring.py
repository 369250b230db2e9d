"""Pairs/s of batched vs one-at-a-time RM scoring, measured side by side in one run.

    python bench/rm_scoring.py --world worlds/demo --rm runs/rm [--pairs 256]

Writes bench/results/rm_scoring.json. Rounds alternate (batched, single, batched, ...) so machine
noise hits both alike; the ratio is of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from caig_ray.data import load_log_image, read_click_logs
from caig_ray.models.reward import load_reward_model
from caig_ray.scoring import PairScorer, PairToScore
from caig_ray.world import WorldLayout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world", required=True)
    p.add_argument("--rm", required=True)
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "rm_scoring.json"))
    args = p.parse_args()
    lay = WorldLayout(args.world)
    logs = read_click_logs(lay.click_logs, check_images=False)
    n = min(args.pairs, logs.num_rows - 1)
    pairs = [PairToScore(load_log_image(logs, i, lay.root), load_log_image(logs, i + 1, lay.root), "product")
             for i in range(n)]
    model, processor = load_reward_model(args.rm)
    batched = PairScorer(model, processor, batch_size=args.batch_size)
    single = PairScorer(model, processor, batch_size=1)
    times: dict[str, list[float]] = {"batched": [], "single": []}
    for _ in range(args.repeats):
        for name, scorer in (("batched", batched), ("single", single)):
            t = time.perf_counter()
            scorer.score(pairs, debias=False)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"pairs": n, "batch_size": args.batch_size, "repeats": args.repeats,
           "pairs_per_s_batched": n / med["batched"], "pairs_per_s_single": n / med["single"],
           "speedup_batched_over_single": med["single"] / med["batched"], "times_s": times,
           "device": "cpu (2 cores)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "times_s"}, indent=1))


if __name__ == "__main__":
    main()
