"""Streaming vs sequential, and what the renderer pool buys: the online loop measured side by side.

    python bench/pipeline.py --demo runs/demo [--rounds 3] [--products 160] [--repeats 3] [--latency 0.25]

``--demo`` is a ``caig-ray demo`` output folder (world, pretrained PM, RM). Every variant runs the
same products, rounds, models and seeds through ``caig-ray train`` (jobs/train.py):

- sequential: CAIG's scripts -- sample all, then render all (one Ray Data run), then score all
  (another), then train; each stage starts when the last has ended;
- streaming lag 0: one job-long pipeline, training on the first scored blocks (strict rounds);
- streaming lag 1: the next round is sampled and rendered while this one trains.

Variants are interleaved (repeat 1: seq, s0, s1; repeat 2: ...) so machine noise hits all alike;
the ratios are of the medians over repeats.

``--reuse`` reads back the runs an interrupted invocation already finished in ``--work``.

Then the pool: on 2 CPU cores the procedural renderer is CPU-bound, so more renderer actors only
share the same cores (measured: 35 / 33 / 27 pairs/s at 1 / 2 / 4). A GPU renderer is
latency-bound instead (docs/models.md, GPU check), so here each renderer actor also waits
``renderer.simulated_latency_s`` (``--latency``) per image -- a stand-in for a remote GPU's render
time, said wherever the numbers appear. With it:
- scaling: a fixed pool of 1, 2, 4 and 8 actors, pairs/s over the rounds (lag 1, small blocks so
  every actor has work); ``scaling_efficiency_at_4`` = pairs/s at 4 / (4 x pairs/s at 1);
- backlog step: an autoscaling pool (1..8), strict rounds: each round's blocks are fed at once, the
  pool grows, and shrinks while the policy trains; the pool-size trace is plotted
  (bench/results/pipeline_pool_trace.png).
Reported per run: wall time of the job and of its rounds, pairs/s, renderer busy fraction (render
seconds / renderer actor-seconds alive), the time the trainer waited for scored pairs, and the
pool-size trace. Writes bench/results/pipeline.json.
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


def run_one(demo: Path, work: Path, name: str, overrides: dict, reuse: bool = False) -> dict:
    """One ``caig-ray train`` run; with ``reuse``, a run folder this bench already finished (its
    summary.json) is read back instead of run again (an interrupted invocation continued)."""
    from caig_ray.jobs.train import train

    cfg = load_config("demo", overrides=overrides)
    done = work / name / "summary.json"
    if reuse and done.is_file():
        s = json.loads(done.read_text())
    else:
        # resume: an interrupted run of this bench continues; an absent folder starts a new run
        s = train(cfg, work / name, str(demo / "pm"), str(demo / "rm"), str(WorldLayout(demo / "world").catalog),
                  resume=True, progress=False)
    lines = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    rounds_s = sum(x["round_s"] for x in lines if x["kind"] == "round")
    alive = _actor_seconds(s["renderer_pool_trace"])
    return {
        "name": name, "wall_s": s["online_wall_s"], "rounds_s": rounds_s, "pairs": s["pairs_planned"],
        "pairs_per_s_rounds": s["pairs_planned"] / rounds_s, "trainer_wait_s": s["driver_wait_s"],
        "train_s": s["train_s"], "render_busy_s": s["render_busy_s"], "renderer_actor_s": alive,
        "renderer_busy_fraction": s["render_busy_s"] / alive if alive else None,
        "renderer_pool_size_max": s["renderer_pool_size_max"], "pairs_lost": s["pairs_lost"],
        "pairs_duplicated": s["pairs_duplicated"], "pool_trace": s["renderer_pool_trace"],
    }


def _plot_trace(run: dict, folder: Path, png: Path) -> None:
    """Renderer pool size over time in the backlog run, with when each round started being fed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = run["pool_trace"]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.step([t for t, _, _ in trace], [r for _, r, _ in trace], where="post", label="renderer actors alive")
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for k, x in enumerate(x for x in records if x["kind"] == "round"):
        ax.axvspan(x["t_start_s"], x["t_end_s"], color="tab:orange", alpha=0.12, lw=0,
                   label="a round: sampled, fed at once, rendered, trained" if k == 0 else None)
    ax.set_xlabel("seconds since the pipeline started")
    ax.set_ylabel("renderers")
    ax.set_title("Backlog step: a round's blocks fed at once, pool 1..8 "
                 "(simulated render latency, stands for a remote GPU)", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--products", type=int, default=160)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latency", type=float, default=0.25,
                   help="renderer.simulated_latency_s for the pool runs: seconds per image, a remote GPU's render time")
    p.add_argument("--pool-products", type=int, default=64, help="products per round in the pool runs")
    p.add_argument("--reuse", action="store_true",
                   help="read back runs already finished in --work (continue an interrupted invocation)")
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
            r = run_one(demo, work, f"{name}_{rep}", over, args.reuse)
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
    # the pool, with a latency-bound renderer (renderer.simulated_latency_s: a remote GPU's render time)
    latency = {"renderer": {"simulated_latency_s": args.latency}}
    small = {"rounds": 2, "products_per_round": args.pool_products, "eval_products": 16, "eval_every": 2,
             "pairs_per_batch": 4, "seed": 0}
    scaling = []
    for k in (1, 2, 4, 8):
        # 0.05 CPU each: 8 renderers + 2 policy ranks (0.5) + the scorer (0.25) fit 2 CPUs; a pool whose
        # min_size cannot all start would wait forever (measured: 8 x 0.1 did)
        r = run_one(demo, work, f"pool{k}", {**latency, "online": {**small, "max_policy_lag": 1},
                                             "resources": {"renderers": {"min_size": k, "max_size": k, "num_cpus": 0.05}}},
                    args.reuse)
        scaling.append({"renderers": k, **{m: r[m] for m in ("pairs_per_s_rounds", "rounds_s", "renderer_busy_fraction",
                                                              "trainer_wait_s", "renderer_pool_size_max")}})
        print(f"pool {k}: {r['pairs_per_s_rounds']:5.2f} pairs/s, renderer busy {r['renderer_busy_fraction'] or 0:.2f}",
              flush=True)
    one = scaling[0]["pairs_per_s_rounds"]
    efficiency = {f"scaling_efficiency_at_{s['renderers']}": s["pairs_per_s_rounds"] / (s["renderers"] * one)
                  for s in scaling}
    backlog = run_one(demo, work, "backlog", {**latency, "online": {**small, "rounds": 3, "eval_every": 3,
                                                                    "max_policy_lag": 0},
                                              "resources": {"renderers": {"min_size": 1, "max_size": 8, "num_cpus": 0.05}}},
                      args.reuse)
    plot = Path(args.out).with_name("pipeline_pool_trace.png")
    _plot_trace(backlog, work / "backlog", plot)
    result = {"rounds": args.rounds, "products_per_round": args.products, "repeats": args.repeats,
              "median": med, "ratios": ratios, "runs": runs,
              "simulated_latency_s_per_image": args.latency, "pool_products_per_round": args.pool_products,
              "scaling": scaling, **efficiency,
              "backlog": {k: backlog[k] for k in ("pool_trace", "renderer_pool_size_max", "rounds_s")},
              "pool_trace_plot": plot.name}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for k, v in {**ratios, **efficiency}.items():
        print(f"{k}: {v:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"bench took {time.perf_counter() - started:.0f} s")
