"""A fault run of the quick preset beside a clean one: the last policy rank's process dies in the
middle of round 1 (its 3rd train step), the job recovers in-job from round 0's checkpoint in
``storage``, and both runs are compared.

    python bench/fault_run.py [--work DIR] [--storage URI_OR_PATH]

Builds the quick world (``make-world --preset quick``), then runs ``caig-ray train --preset quick``
twice on it: clean, and with ``online.faults.policy_rank_die_at_step: 3``. Prints recoveries, pairs
lost and duplicated, the true-CTR curve of each run and the largest weight difference between the
two final policies. Writes bench/results/fault_run.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from caig_ray.config import load_config
from caig_ray.world import WorldLayout, make_world


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--storage", default=None, help="storage for both runs (default: --work)")
    p.add_argument("--out", default="bench/results/fault_run.json")
    args = p.parse_args()
    from caig_ray.jobs.train import train

    work = Path(args.work or tempfile.mkdtemp(prefix="caig-fault-run-"))
    from caig_ray.storage import new_run_id

    storage = args.storage or str(work)  # each invocation's runs in their own folders (a used one is refused)
    world = WorldLayout(work / "world")
    make_world(load_config("quick"), world.root, progress=False)
    runs = {}
    for name, faults in (("clean", {}), ("policy_rank_killed", {"marker_dir": str(work / "faults"),
                                                                 "policy_rank_die_at_step": 3})):
        # lr 1e-3 (the tests' value) so the policy visibly moves in 2 rounds; the rest is the quick preset
        # tie_margin None: the quick world's random PM mostly yields tied pairs (the same plain ad twice),
        # which the default skips; this run is about recovery, so it trains them as CAIG's scripts do
        cfg = load_config("quick", overrides={"storage": storage, "online": {"faults": faults, "tie_margin": None},
                                              "policy": {"lr": 1e-3}})
        t = time.perf_counter()
        s = train(cfg, f"runs/{name}-{new_run_id()}", str(world.policy), str(world.reward), str(world.catalog), progress=False)
        runs[name] = {k: s[k] for k in ("recoveries", "recoveries_by_kind", "pairs_planned", "pairs_trained",
                                        "pairs_skipped", "pairs_lost", "pairs_duplicated", "steps",
                                        "true_ctr_by_round", "eval_after_rounds")} | {"wall_s": time.perf_counter() - t}
        print(f"{name:>20}: recoveries {s['recoveries']}, pairs lost {s['pairs_lost']}, duplicated "
              f"{s['pairs_duplicated']}, trained {s['pairs_trained']}/{s['pairs_planned']}, true CTR by round "
              f"{[round(x, 6) for x in s['true_ctr_by_round']]}, {runs[name]['wall_s']:.0f} s")
    a = load_file(Path(storage) / "runs" / "clean" / "policy" / "model.safetensors")
    b = load_file(Path(storage) / "runs" / "policy_rank_killed" / "policy" / "model.safetensors")
    start = load_file(world.policy / "model.safetensors")
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    moved = max(float((a[k].float() - start[k].float()).abs().max()) for k in a)
    same_curve = runs["clean"]["true_ctr_by_round"] == runs["policy_rank_killed"]["true_ctr_by_round"]
    print(f"same true-CTR curve: {same_curve}; max |weight difference| of the final policies: {worst:.2e} "
          f"(each moved up to {moved:.2e} from the pretrained PM)")
    result = {"command": "python bench/fault_run.py", "preset": "quick", "fault": "policy_rank_die_at_step: 3",
              "runs": runs, "same_true_ctr_curve": same_curve, "max_abs_weight_diff": worst,
              "max_abs_weight_moved_from_start": moved}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
