"""CAIG's findings in world v2, pre-registered (``bench/preregistration_v2.md``): E1-E5 over independent
replicates, in world v2 and its no-attention control.

    python bench/reproduce_paper.py [--replicates 5] [--work /tmp/caig_repro_v2] [--only 0 1]

Replicate r has its own world (catalog, logs, market noise), perception-pretrained tower, PM, RM and
policy seed (``replicate_overrides``). In each of its two worlds (``demo`` = v2, ``demo-no-attention`` =
control): make-world, pretrain-pm, train-rm from that PM (CAIG), evaluate-rm (RM, title-blanked RM, CNN,
McNemar). The lr is chosen per replicate from ``LRS`` by DPO+PCPO's true-CTR lift on the *validation*
half of the held-out products (crc32(id) even); then v2: DPO and DPO+PCPO, control: DPO, all at that lr.
Everything reported comes from the *test* half.

Resumable replicate by replicate: the result file (bench/results/paper_repro_v2.json) holds every
finished replicate, and a replicate already in it is not run again (so a benchmark can span sessions:
commit the JSON after each replicate). Inside a replicate, every stage is skipped when its output is
already in ``--work``. Every run stays in the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))

from caig_ray.config import load_config  # noqa: E402
from caig_ray.online import paired_lift  # noqa: E402
from caig_ray.world import WorldLayout  # noqa: E402

PREREGISTERED_REPLICATES = 5
LRS = (5e-4, 1e-3)
ROUNDS = 5
WORLDS = {"v2": "demo", "control": "demo-no-attention"}
RESULTS = Path(__file__).parent / "results"
PREREGISTRATION = Path(__file__).parent / "preregistration_v2.md"
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
log = logging.getLogger("reproduce_paper")


def replicate_overrides(r: int) -> dict:
    """Config overrides of replicate ``r``: every seed drawn again."""
    return {"seed": r, "market": {"seed": r}, "perception": {"seed": r}, "policy": {"tiny": {"seed": 10 * r}},
            "reward": {"tiny": {"seed": 10 * r + 1}}, "train_rm": {"seed": r}, "pretrain": {"seed": r},
            "online": {"seed": r}}


def is_validation(product_id: str) -> bool:
    """The held-out products' split: validation (lr choice) or test (reported); fixed by the id."""
    return zlib.crc32(product_id.encode()) % 2 == 0


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def eval_by_split(run_dir: Path) -> dict:
    """Per split (validation / test), from the run's eval_XXX.parquet (one row per held-out product and
    sample; a = tuned, b = pretrained): mismatch share of all ads and true CTR by evaluation, and the
    last evaluation's lift (paired by product: each product's mean over its samples)."""
    files = sorted((run_dir / "pairs").glob("eval_*.parquet"))
    out = {}
    for split, want in (("validation", True), ("test", False)):
        mismatch, ctr, lift = [], [], None
        for f in files:
            rows = [x for x in pq.read_table(f).to_pylist() if is_validation(x["product_id"]) == want]
            mismatch.append(float(np.mean([x["has_scene_a"] and not x["match_a"] for x in rows])))
            ctr.append(float(np.mean([x["true_ctr_a"] for x in rows])))
            by: dict[str, list] = {}
            for x in rows:
                by.setdefault(x["product_id"], []).append((x["true_ctr_a"], x["true_ctr_b"]))
            means = np.array([np.mean(v, axis=0) for v in by.values()])
            lift = paired_lift(means[:, 0].tolist(), means[:, 1].tolist())
        out[split] = {"mismatch_share_by_eval": mismatch, "true_ctr_by_eval": ctr, "lift": lift,
                      "n_products": len(by)}
    return out


def across(values: list[float]) -> dict:
    """Mean and 95% CI over replicates (Student t: k is small)."""
    v = np.asarray(values, dtype=float)
    k = v.size
    half = T975.get(k - 1, 1.96) * v.std(ddof=1) / np.sqrt(k) if k > 1 else float("nan")
    return {"mean": float(v.mean()), "ci95": [float(v.mean() - half), float(v.mean() + half)], "values": v.tolist(), "k": k}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()


class Replicate:
    """One replicate's folders and stages; each stage runs only when its output is missing."""

    def __init__(self, r: int, work: Path):
        self.r, self.root = r, work / f"r{r}"

    def cfg(self, world: str, **extra):
        return load_config(WORLDS[world], overrides=_merge(replicate_overrides(self.r), extra))

    def world(self, world: str) -> Path:
        d = self.root / world / "world"
        if not (d / "market.json").is_file():
            from caig_ray.world import make_world

            log.info("r%d %s: make-world", self.r, world)
            make_world(self.cfg(world), d, progress=False)
        return d

    def models(self, world: str) -> tuple[Path, Path]:
        """(PM, RM) of this world: the PM pretrained on its logs, the RM started from that PM."""
        import ray

        from caig_ray.jobs._ray import init_ray
        from caig_ray.jobs.pretrain_pm import pretrain_pm
        from caig_ray.jobs.train_rm import _init_from, train_rm

        pm, rm = self.root / world / "pm", self.root / world / "rm"
        if (pm / "config.json").is_file() and (rm / "config.json").is_file():
            return pm, rm
        cfg = self.cfg(world)
        w = self.world(world)
        started = init_ray(max(2, cfg.resources.reward_training.num_workers, cfg.resources.pretraining.num_workers))
        try:
            if not (pm / "config.json").is_file():
                log.info("r%d %s: pretrain-pm", self.r, world)
                pretrain_pm(cfg, w, pm)
            if not (rm / "config.json").is_file():
                log.info("r%d %s: train-rm --init-from pm", self.r, world)
                train_rm(_init_from(cfg, pm), w, rm)
        finally:
            if started:
                ray.shutdown()
        return pm, rm

    def rm_eval(self, world: str) -> dict:
        from caig_ray.jobs.evaluate_rm import evaluate_rm

        path = self.root / world / "rm_eval.json"
        if not path.is_file():
            log.info("r%d %s: evaluate-rm (RM, title-blanked RM, CNN)", self.r, world)
            evaluate_rm(self.cfg(world), self.world(world), self.models(world)[1], path)
        return json.loads(path.read_text())

    def mismatch_probe(self, world: str) -> dict:
        from rm_mismatch_probe import probe

        path = self.root / world / "mismatch_probe.json"
        if not path.is_file():
            path.write_text(json.dumps(probe(self.cfg(world), self.world(world), self.models(world)[1]), indent=1))
        return json.loads(path.read_text())

    def run(self, world: str, variant: str, lr: float) -> dict:
        from caig_ray.jobs.train import train

        out = self.root / world / "runs" / f"{variant.replace('+', '_')}_lr{lr:g}"
        if not (out / "summary.json").is_file():
            pm, rm = self.models(world)
            cfg = self.cfg(world, policy={"pcpo_weight": 1.0 if variant == "DPO+PCPO" else 0.0, "lr": lr},
                           online={"rounds": ROUNDS, "eval_every": ROUNDS})
            log.info("r%d %s: train %s lr %g", self.r, world, variant, lr)
            train(cfg, out, str(pm), str(rm), str(WorldLayout(self.world(world)).catalog), resume=True, progress=False)
        s = json.loads((out / "summary.json").read_text())
        return {"lr": lr, "wall_s": s["online_wall_s"], "pairs_trained": s["pairs_trained"],
                "pairs_lost": s["pairs_lost"], "pairs_skipped_tie": s["pairs_skipped_tie"], **eval_by_split(out)}

    def all(self) -> dict:
        t0 = time.perf_counter()
        ev = {w: self.rm_eval(w) for w in WORLDS}
        probe = self.mismatch_probe("v2")
        tried = {lr: self.run("v2", "DPO+PCPO", lr) for lr in LRS}
        lr = max(tried, key=lambda x: tried[x]["validation"]["lift"]["diff"])
        runs = {"v2": {"DPO+PCPO": tried[lr], "DPO": self.run("v2", "DPO", lr)},
                "control": {"DPO": self.run("control", "DPO", lr)}}
        return {"replicate": self.r, "overrides": replicate_overrides(self.r), "lr_chosen": lr,
                "validation_lift_by_lr": {f"{k:g}": v["validation"]["lift"]["diff"] for k, v in tried.items()},
                "runs_not_chosen": {f"DPO+PCPO lr {k:g}": v for k, v in tried.items() if k != lr},
                "rm_eval": {w: {k: e[k] for k in (
                    "rm_accuracy_logged", "rm_title_blanked_accuracy_logged", "cnn_baseline_accuracy_logged",
                    "bayes_ceiling_test_pairs", "n_test_pairs", "mcnemar_rm_vs_cnn")} for w, e in ev.items()},
                "mismatch_probe_v2": probe,
                "perception_probe": {w: json.loads(WorldLayout(self.world(w)).perception.read_text())["probe_accuracy"]
                                     for w in WORLDS},
                "runs": runs, "code_commit": _git("rev-parse", "HEAD"), "wall_s": time.perf_counter() - t0}


def endpoints(reps: list[dict]) -> dict:
    """E1-E5 as pre-registered (bench/preregistration_v2.md)."""
    done = len(reps) >= PREREGISTERED_REPLICATES

    def verdict(holds: bool) -> str:
        return ("reproduced" if holds else "not reproduced") if done else f"incomplete ({len(reps)} of {PREREGISTERED_REPLICATES})"

    ev = [x["rm_eval"]["v2"] for x in reps]
    e1 = across([e["rm_accuracy_logged"] - e["cnn_baseline_accuracy_logged"] for e in ev])
    e2 = across([e["rm_accuracy_logged"] - e["rm_title_blanked_accuracy_logged"] for e in ev])
    rise = lambda run: run["test"]["mismatch_share_by_eval"][-1] - run["test"]["mismatch_share_by_eval"][0]  # noqa: E731
    v2_rise = across([rise(x["runs"]["v2"]["DPO"]) for x in reps])
    ctl_rise = across([rise(x["runs"]["control"]["DPO"]) for x in reps])
    rise_diff = across([rise(x["runs"]["v2"]["DPO"]) - rise(x["runs"]["control"]["DPO"]) for x in reps])
    e4 = across([x["runs"]["v2"]["DPO+PCPO"]["test"]["mismatch_share_by_eval"][-1]
                 - x["runs"]["v2"]["DPO"]["test"]["mismatch_share_by_eval"][-1] for x in reps])
    e5 = across([x["runs"]["v2"]["DPO+PCPO"]["test"]["lift"]["diff"] for x in reps])
    k = len(reps)
    return {
        "E1": {"claim": "RM - CNN pairwise accuracy > 0 (v2, same held-out band pairs)", "estimate": e1,
               "mcnemar_p_by_replicate": [e["mcnemar_rm_vs_cnn"]["p_two_sided"] for e in ev],
               "verdict": verdict(k > 1 and e1["ci95"][0] > 0)},
        "E2": {"claim": "title-blanked RM's edge over the CNN is smaller: RM - blanked RM accuracy > 0",
               "estimate": e2, "verdict": verdict(k > 1 and e2["ci95"][0] > 0)},
        "E3": {"claim": "DPO's mismatch share rises from round 0 to the last round in v2, not in the control",
               "v2_rise": v2_rise, "control_rise": ctl_rise, "estimate": rise_diff,
               "verdict": verdict(k > 1 and v2_rise["ci95"][0] > 0 and rise_diff["ci95"][0] > 0)},
        "E4": {"claim": "DPO+PCPO's final mismatch share is below DPO's (v2)", "estimate": e4,
               "verdict": verdict(k > 1 and e4["ci95"][1] < 0)},
        "E5": {"claim": "DPO+PCPO's true-CTR lift over the pretrained PM > 0 (v2)", "estimate": e5,
               "verdict": verdict(k > 1 and e5["ci95"][0] > 0)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicates", type=int, default=PREREGISTERED_REPLICATES)
    p.add_argument("--only", type=int, nargs="*", help="run just these replicates (the rest stay as in the JSON)")
    p.add_argument("--work", default="/tmp/caig_repro_v2", help="where worlds, models and runs are written")
    p.add_argument("--out", default=str(RESULTS / "paper_repro_v2.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    reps = {x["replicate"]: x for x in result.get("replicates", [])}
    prereg = _git("log", "--diff-filter=A", "--format=%H", "--", str(PREREGISTRATION.name)).splitlines()
    for r in args.only if args.only is not None else range(args.replicates):
        if r in reps:
            log.info("r%d: in %s already", r, out)
            continue
        reps[r] = Replicate(r, Path(args.work)).all()
        ordered = [reps[k] for k in sorted(reps)]
        result = {"preregistration": str(PREREGISTRATION.relative_to(Path(__file__).parent.parent)),
                  "preregistration_commit": prereg[-1] if prereg else None,
                  "preregistered_replicates": PREREGISTERED_REPLICATES, "independent_replicates": len(ordered),
                  "worlds": WORLDS, "lr_candidates": list(LRS), "rounds": ROUNDS,
                  "split": "held-out products: validation (crc32(id) even, lr choice) / test (reported)",
                  "endpoints": endpoints(ordered) if len(ordered) else {}, "replicates": ordered}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"r{r} done: wrote {out} ({len(ordered)} replicates)", flush=True)
        for name, e in result["endpoints"].items():
            print(f"  {name}: {e['estimate']['mean']:+.4f} CI {[round(c, 4) for c in e['estimate']['ci95']]} -> {e['verdict']}",
                  flush=True)


if __name__ == "__main__":
    main()
