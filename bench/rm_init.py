"""Does the RM learn more when it starts from the e-commerce-pretrained PM (CAIG) than from the
world's random backbone? Same pairs, same held-out band pairs, side by side.

    python bench/rm_init.py --work runs/rm_init [--preset demo]

Builds (or reuses, under ``--work``) the preset's world and its pretrained PM (``make-world``,
``pretrain-pm``), then trains the RM three times -- ``train-rm`` from the world's backbone,
``train-rm --init-from PM``, and the latter asking every pair one question
(``reward.question_templates: 1``) -- and evaluates each with ``evaluate-rm`` (the CNN baseline and the
Bayes ceiling come with it, on the same pairs). Writes bench/results/rm_init.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from caig_ray.config import load_config
from caig_ray.world import WorldLayout, make_world


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--preset", default="demo")
    p.add_argument("--out", default="bench/results/rm_init.json")
    args = p.parse_args()
    from caig_ray.jobs.evaluate_rm import evaluate_rm
    from caig_ray.jobs.pretrain_pm import pretrain_pm
    from caig_ray.jobs.train_rm import _init_from, train_rm

    cfg = load_config(args.preset)
    work = Path(args.work)
    world = WorldLayout(work / "world")
    if not world.catalog.exists():
        make_world(cfg, world.root, progress=False)
    pm = work / "pm"
    if not (pm / "config.json").exists():
        pretrain_pm(cfg, world.root, pm)
    rows = {}
    # the third run asks every pair the first question only (reward.question_templates 1): what CAIG's
    # question variety costs or gives the RM, from the same start
    one_question = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"question_templates": 1})})
    for name, base, init in (("world_backbone", cfg, None), ("pretrained_pm", cfg, str(pm)),
                             ("pretrained_pm_one_question", one_question, str(pm))):
        t = time.perf_counter()
        train_rm(_init_from(base, init), world.root, work / f"rm_{name}")
        ev = evaluate_rm(cfg, world.root, work / f"rm_{name}", work / f"rm_{name}_eval.json")
        rows[name] = {"rm_accuracy_logged": ev["rm_accuracy_logged"],
                      "rm_debiased_accuracy_logged": ev["rm_debiased_accuracy_logged"],
                      "rm_accuracy_true": ev["rm_accuracy_true"], "n_test_pairs": ev["n_test_pairs"],
                      "cnn_baseline_accuracy_logged": ev["cnn_baseline_accuracy_logged"],
                      "bayes_ceiling": ev["bayes_ceiling_test_pairs"], "train_and_eval_s": time.perf_counter() - t}
        r = rows[name]
        print(f"{name:>15}: RM {r['rm_accuracy_logged']:.3f} (debiased {r['rm_debiased_accuracy_logged']:.3f}) vs "
              f"CNN {r['cnn_baseline_accuracy_logged']:.3f} on {r['n_test_pairs']} held-out pairs; "
              f"ceiling {r['bayes_ceiling']:.3f}")
    result = {"command": f"python bench/rm_init.py --work {args.work} --preset {args.preset}", "preset": args.preset,
              "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
