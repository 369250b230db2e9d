"""CAIG's two policy findings in the simulated market: DPO alone vs DPO+PCPO, same budget, several seeds.

    python bench/reproduce_paper.py --demo runs/demo [--seeds 3] [--rounds 5] [--preset demo]

``--demo`` is a ``caig-ray demo`` output folder (its world, pretrained PM ``pm/`` and RM ``rm/``).
Each (variant, seed) is one ``caig-ray train`` run with ``policy.pcpo_weight`` 0 (DPO) or 1
(DPO+PCPO) and ``online.seed`` = seed; runs are interleaved (dpo s0, pcpo s0, dpo s1, ...) so
machine noise hits both alike. Reported: (a) match rate per round (held-out products, market
oracle); (b) the true-CTR lift of the tuned PM over the pretrained PM after the last round, per
seed with its 95% CI over products, and over seeds (mean ± 1.96·sd/√seeds). Writes
bench/results/paper_repro.json and bench/results/paper_repro.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from caig_ray.config import load_config
from caig_ray.world import WorldLayout

VARIANTS = {"DPO": 0.0, "DPO+PCPO": 1.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", required=True, help="caig-ray demo output folder")
    p.add_argument("--preset", default="demo")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--work", default="/tmp/caig_paper_repro", help="where the runs are written")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "paper_repro.json"))
    args = p.parse_args()

    from jobs.caig import train

    demo = Path(args.demo)
    lay = WorldLayout(demo / "world")
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        for name, weight in VARIANTS.items():
            cfg = load_config(args.preset, overrides={"policy": {"pcpo_weight": weight},
                                                       "online": {"seed": seed, "rounds": args.rounds}})
            out = Path(args.work) / f"{name.replace('+', '_')}_s{seed}"
            s = train(cfg, out, str(demo / "pm"), str(demo / "rm"), str(lay.catalog), progress=False)
            runs[name].append({"seed": seed, "match_rate_by_round": s["match_rate_by_round"],
                               "true_ctr_by_round": s["true_ctr_by_round"], "rm_win_rate_by_round": s["rm_win_rate_by_round"],
                               "lift": s["true_ctr_lift"], "wall_s": s["wall_s"], "pairs_skipped": s["pairs_skipped"]})
            print(f"{name:9s} seed {seed}: match {['%.3f' % m if m is not None else '-' for m in s['match_rate_by_round']]}"
                  f" lift {100 * s['true_ctr_lift']['diff']:+.3f} pts CI {[round(100 * c, 3) for c in s['true_ctr_lift']['ci95']]}"
                  f" ({s['wall_s']:.0f} s)", flush=True)

    result = {"rounds": args.rounds, "seeds": args.seeds, "runs": runs, "wall_s": time.perf_counter() - t0}
    for name, rs in runs.items():
        match = np.array([[np.nan if m is None else m for m in r["match_rate_by_round"]] for r in rs], dtype=float)
        lifts = np.array([r["lift"]["diff"] for r in rs])
        rel = np.array([r["lift"]["relative"] for r in rs])
        half = 1.96 * lifts.std(ddof=1) / math.sqrt(len(lifts)) if len(lifts) > 1 else float("nan")
        result[name] = {
            "match_rate_by_round_mean": np.nanmean(match, axis=0).tolist(),
            "final_match_rate_mean": float(np.nanmean(match[:, -1])),
            "true_ctr_lift_mean": float(lifts.mean()), "true_ctr_lift_ci95_over_seeds": [float(lifts.mean() - half),
                                                                                          float(lifts.mean() + half)],
            "true_ctr_relative_lift_mean": float(rel.mean()),
        }
    result["pcpo_final_match_minus_dpo"] = result["DPO+PCPO"]["final_match_rate_mean"] - result["DPO"]["final_match_rate_mean"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    _plot(result, Path(args.out).with_suffix(".png"))
    for name in VARIANTS:
        r = result[name]
        print(f"{name:9s} match by round {[round(m, 3) for m in r['match_rate_by_round_mean']]}  "
              f"true-CTR lift {100 * r['true_ctr_lift_mean']:+.3f} pts (95% CI over seeds "
              f"{[round(100 * c, 3) for c in r['true_ctr_lift_ci95_over_seeds']]}), relative {100 * r['true_ctr_relative_lift_mean']:+.1f}%")
    print(f"wrote {args.out}")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for name in VARIANTS:
        rs = result["runs"][name]
        m = result[name]["match_rate_by_round_mean"]
        axes[0].plot(range(len(m)), m, "o-", label=name)
        ctr = np.array([r["true_ctr_by_round"] for r in rs], dtype=float) * 100
        axes[1].plot(range(ctr.shape[1]), ctr.mean(0), "o-", label=name)
    axes[0].set_title("match rate (held-out, mean over seeds)")
    axes[1].set_title("true CTR % (held-out, mean over seeds)")
    for ax in axes:
        ax.set_xlabel("rounds trained")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
