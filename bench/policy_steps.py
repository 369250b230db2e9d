"""DPO+PCPO step time of the PolicyGroup per ZeRO stage, measured side by side in one run.

    python bench/policy_steps.py --world worlds/quick [--workers 2] [--steps 5] [--batch 8]

Stages are run in rounds (1, 2, 3, 1, 2, 3, ...) so machine noise hits all alike; writes
bench/results/policy_steps.json with the median step time per stage and ratios to ZeRO-1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import ray

from caig_ray.actors.policy import PolicyGroup
from caig_ray.config import load_config
from caig_ray.data import read_catalog
from caig_ray.imaging import png_bytes
from caig_ray.prompts import pm_instruction
from caig_ray.rows import PreferenceExample
from caig_ray.world import WorldLayout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "policy_steps.json"))
    args = p.parse_args()
    lay = WorldLayout(args.world)
    products = read_catalog(lay.catalog)[: args.batch]
    batch = [PreferenceExample(pair_id=str(i), image=png_bytes(x.image), instruction=pm_instruction(x.title, x.attributes),
                               chosen="a bright stadium background, vivid tones", rejected="dim kitchen, busy", seed=i)
             for i, x in enumerate(products)]
    ray.init(address="local", num_cpus=max(2, args.workers), include_dashboard=False)
    groups, init_s = {}, {}
    for stage in (1, 2, 3):
        full = load_config("quick", overrides={"policy": {"zero_stage": stage},
                                               "resources": {"policy": {"num_workers": args.workers, "num_cpus": 0.3}}})
        cfg, placement = full.policy, full.resources.policy
        t = time.perf_counter()
        groups[stage] = PolicyGroup(lay.policy, cfg, placement)
        init_s[stage] = time.perf_counter() - t
        groups[stage].train_step(batch)  # warm-up
    times: dict[int, list[float]] = {s: [] for s in groups}
    for _ in range(args.steps):
        for stage, group in groups.items():
            t = time.perf_counter()
            group.train_step(batch)
            times[stage].append(time.perf_counter() - t)
    med = {s: statistics.median(v) for s, v in times.items()}
    res = {"workers": args.workers, "batch": args.batch, "steps": args.steps, "device": "cpu (2 cores), gloo",
           "step_s_median": {f"zero{s}": v for s, v in med.items()},
           "ratio_to_zero1": {f"zero{s}": v / med[1] for s, v in med.items()},
           "init_s": {f"zero{s}": v for s, v in init_s.items()},
           "step_s_all": {f"zero{s}": v for s, v in times.items()}}
    for g in groups.values():
        g.shutdown()
    ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "step_s_all"}, indent=1))


if __name__ == "__main__":
    main()
