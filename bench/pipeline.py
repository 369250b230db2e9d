"""Streaming vs sequential: the same online work run CAIG's way and caig-ray's way, side by side.

    python bench/pipeline.py --demo runs/demo [--rounds 3] [--products 160] [--repeats 1]

``--demo`` is a ``caig-ray demo`` output folder (world, pretrained PM, RM). Every variant runs the
same products, rounds, models and seeds through ``caig-ray train`` (jobs/caig.py):

- sequential: CAIG's scripts -- sample all, then render all (one Ray Data run), then score all
  (another), then train; each stage starts when the last has ended;
- streaming lag 0: one job-long pipeline, training on the first scored blocks (strict rounds);
- streaming lag 1: the next round is sampled and rendered while this one trains.

Variants are interleaved (repeat 1: seq, s0, s1; repeat 2: ...) so machine noise hits all alike.
Then the scaling curve: streaming with a fixed renderer pool of 1, 2 and 4 actors (fractional
CPUs here) vs pairs/s. Reported per run: wall time of the job and of its rounds, pairs/s,
renderer busy fraction (render seconds / renderer actor-seconds alive), the time the trainer
waited for scored pairs, and the pool-size trace. Writes bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from caig_ray.config import load_config
from caig_ray.world import WorldLayout


def _actor_seconds(trace: list, col: int = 1) -> float:
    return sum(trace[i][col] * (trace[i + 1][0] - trace[i][0]) for i in range(len(trace) - 1))


def run_one(demo: Path, work: Path, name: str, overrides: dict) -> dict:
    from jobs.caig import train

    cfg = load_config("demo", overrides=overrides)
    s = train(cfg, work / name, str(demo / "pm"), str(demo / "rm"), str(WorldLayout(demo / "world").catalog),
              progress=False)
    lines = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    rounds_s = sum(x["round_s"] for x in lines if x["kind"] == "round")
    alive = _actor_seconds(s["renderer_pool_trace"])
    return {
        "name": name, "wall_s": s["wall_s"], "rounds_s": rounds_s, "pairs": s["pairs_planned"],
        "pairs_per_s_rounds": s["pairs_planned"] / rounds_s, "trainer_wait_s": s["driver_wait_s"],
        "train_s": s["train_s"], "render_busy_s": s["render_busy_s"], "renderer_actor_s": alive,
        "renderer_busy_fraction": s["render_busy_s"] / alive if alive else None,
        "renderer_pool_size_max": s["renderer_pool_size_max"], "pairs_lost": s["pairs_lost"],
        "pairs_duplicated": s["pairs_duplicated"], "pool_trace": s["renderer_pool_trace"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--products", type=int, default=160)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--work", default="/tmp/caig_pipeline_bench")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "pipeline.json"))
    args = p.parse_args()
    demo, work = Path(args.demo), Path(args.work)
    base = {"rounds": args.rounds, "products_per_round": args.products, "eval_products": 32,
            "eval_every": args.rounds, "seed": 0}
    variants = {
        "sequential": {"online": {**base, "pipeline": "sequential"}},
        "streaming_lag0": {"online": {**base, "pipeline": "streaming", "max_policy_lag": 0}},
        "streaming_lag1": {"online": {**base, "pipeline": "streaming", "max_policy_lag": 1}},
    }
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for rep in range(args.repeats):
        for name, over in variants.items():
            r = run_one(demo, work, f"{name}_{rep}", over)
            runs[name].append(r)
            print(f"{name:15s} wall {r['wall_s']:6.1f} s  rounds {r['rounds_s']:6.1f} s  {r['pairs_per_s_rounds']:5.1f} pairs/s"
                  f"  trainer waited {r['trainer_wait_s']:5.1f} s  renderer busy {r['renderer_busy_fraction'] or 0:.2f}"
                  f"  pool max {r['renderer_pool_size_max']}", flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "rounds_s", "trainer_wait_s")}
           for k, v in runs.items()}
    ratios = {
        "sequential_over_streaming_lag0_rounds": med["sequential"]["rounds_s"] / med["streaming_lag0"]["rounds_s"],
        "sequential_over_streaming_lag1_rounds": med["sequential"]["rounds_s"] / med["streaming_lag1"]["rounds_s"],
        "sequential_over_streaming_lag0_wall": med["sequential"]["wall_s"] / med["streaming_lag0"]["wall_s"],
        "sequential_over_streaming_lag1_wall": med["sequential"]["wall_s"] / med["streaming_lag1"]["wall_s"],
    }
    scaling = []
    for k in (1, 2, 4):
        r = run_one(demo, work, f"pool{k}", {"online": base, "resources": {"renderers": {"min_size": k, "max_size": k, "num_cpus": 0.1}}})
        scaling.append({"renderers": k, **{m: r[m] for m in ("pairs_per_s_rounds", "rounds_s", "renderer_busy_fraction",
                                                              "trainer_wait_s", "renderer_pool_size_max")}})
        print(f"pool {k}: {r['pairs_per_s_rounds']:5.1f} pairs/s, renderer busy {r['renderer_busy_fraction'] or 0:.2f}",
              flush=True)
    result = {"rounds": args.rounds, "products_per_round": args.products, "repeats": args.repeats,
              "median": med, "ratios": ratios, "runs": runs, "scaling": scaling}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"bench took {time.perf_counter() - started:.0f} s")
