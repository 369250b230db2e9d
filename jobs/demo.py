"""The README demo on the embedded default (``demo`` preset): ``python -m caig_ray.jobs.demo --out DIR``.

make-world (market, click logs, tiny PM/RM/SD); a look at the market (true CTR by category x
scene, sample historical ads, one product rendered by both renderers); PM pretraining
(pretrain-pm); RM training (train-rm) and its evaluation against chance, a CNN baseline and the
Bayes ceiling (evaluate-rm); the online DPO+PCPO loop (train) with its evaluation on held-out
products -- written to ``summary.json``, PNG plots and ``online/report.html``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from caig_ray.config import load_config
from caig_ray.data import load_log_image, read_catalog, read_click_logs
from caig_ray.errors import CaigError
from caig_ray.jobs._entry import configure_logging, print_result, stage, stdout_for_result
from caig_ray.storage import Output, refuse_used
from caig_ray.world import WorldLayout, make_world


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caig-ray demo", description=__doc__)
    p.add_argument("--out", required=True, help="the demo's folder (a used one is refused unless --overwrite)")
    p.add_argument("--preset", default="demo")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.add_argument("--skip-training", action="store_true", help="market only: no pretrain-pm / train-rm")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging()
    with stdout_for_result() as result:  # the summary alone on stdout; every log line on stderr
        return _demo(args, result)


def _demo(args, result) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    out = Path(args.out)
    plots = out / "plots"
    try:
        cfg = load_config(args.preset)
        print(f"caig-ray demo: config preset {args.preset}", file=sys.stderr, flush=True)
        if not args.overwrite:
            refuse_used(Output(out.resolve()), "pass --overwrite to replace it, or give a new --out")
        elif out.is_dir():
            shutil.rmtree(out)  # the user asked to replace it: the old demo's run folders would be refused
        elif out.exists():
            out.unlink()
        plots.mkdir(parents=True, exist_ok=True)
        with stage(f"demo [1/6] make-world ({cfg.market.n_products} products)"):
            world = make_world(cfg, out / "world")
        lay = WorldLayout(out / "world")
        logs = read_click_logs(lay.click_logs)
        products = read_catalog(lay.catalog)
    except CaigError as e:  # what a user can fix (bad config, data, a used --out): one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    with stage("demo [2/6] a look at the market (plots/)"):
        _market_overview(cfg, lay, logs, products, plots)
    summary = {
        "preset": args.preset, "n_products": world["n_products"], "n_creatives": world["n_creatives"],
        # make-world's ceiling is over all band pairs; evaluate-rm's (bayes_ceiling_test_pairs) over its test pairs
        "bayes_ceiling_all_band_pairs": world["bayes_ceiling"], "n_band_pairs": world["n_band_pairs"],
        "mean_true_ctr": world["mean_true_ctr"], "history_match_rate": world["history_match_rate"],
        "stages_run": ["make-world", "market-overview"], "world_times": world["times"],
    }
    if "perception" in world:  # the tiny tower's linear probe on held-out renders, before / after pretraining
        summary["perception_probe_accuracy"] = world["perception"]["probe_accuracy"]
        summary["perception_probe_accuracy_before"] = world["perception"]["probe_accuracy_before"]
    if not args.skip_training:
        summary.update(_train_models(cfg, lay, out, plots))
        summary["stages_run"] += ["pretrain-pm", "train-rm", "evaluate-rm", "train"]
    summary["demo_wall_s"] = time.perf_counter() - t0  # the whole demo (online_wall_s: the online loop)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_result(summary, result)
    print(f"demo written to {out}: summary.json, plots/*.png", file=sys.stderr)
    return 0


def _market_overview(cfg, lay: WorldLayout, logs, products, plots: Path) -> None:
    """True CTR by category x scene, a grid of historical ads, one product rendered by both renderers."""
    from caig_ray.models.renderer import make_renderer
    from caig_ray.report import ad_grid, ctr_heatmap

    truth = pq.read_table(lay.truth).to_pylist()
    ctr_heatmap(truth, plots / "market_ctr_heatmap.png")
    rng = np.random.default_rng(cfg.seed)
    rows = sorted(rng.choice(logs.num_rows, size=min(18, logs.num_rows), replace=False).tolist())
    ad_grid([load_log_image(logs, r, lay.root) for r in rows],
            [f"{truth[r]['scene']} {100 * truth[r]['true_ctr']:.1f}%" for r in rows], plots / "history_ads.png")
    # One product, four descriptions, both renderers, the same seed for all.
    descs = ["bright stadium, vivid colors", "soft pastel vanity, minimal", "dark neon, dramatic", "sunny beach"]
    proc = make_renderer(cfg.renderer)
    tiny_sd = make_renderer(cfg.renderer.model_copy(update={
        "kind": "diffusers", "sd_path": str(lay.sd), "controlnet_path": str(lay.controlnet),
        "image_size": cfg.renderer.tiny_sd_size, "steps": 4}))
    ads = proc.render([products[1].image] * 4, descs, [7] * 4) + tiny_sd.render([products[1].image] * 4, descs, [7] * 4)
    ad_grid([a.image for a in ads], [f"{r.kind}: {d}" for r in (proc, tiny_sd) for d in descs],
            plots / "renderers.png", cols=4)


def _train_models(cfg, lay: WorldLayout, out: Path, plots: Path) -> dict:
    """pretrain-pm, train-rm and evaluate-rm on the demo world, one local Ray instance for all."""
    import ray

    from caig_ray.report import bar_chart, relative_path
    from caig_ray.jobs._ray import init_ray
    from caig_ray.jobs.evaluate_rm import evaluate_rm
    from caig_ray.jobs.pretrain_pm import pretrain_pm
    from caig_ray.jobs.train_rm import _init_from, train_rm

    started = init_ray(max(2, cfg.resources.reward_training.num_workers, cfg.resources.pretraining.num_workers))
    try:
        t = time.perf_counter()
        with stage("demo [3/6] pretrain-pm (the PM's e-commerce SFT)"):
            pm = pretrain_pm(cfg, lay.root, out / "pm")
        pm_s = time.perf_counter() - t
        t = time.perf_counter()
        with stage("demo [4/6] train-rm (from the pretrained PM)"):
            rm = train_rm(_init_from(cfg, out / "pm"), lay.root, out / "rm")  # CAIG: the RM starts from the pretrained PM
        rm_s = time.perf_counter() - t
    finally:
        if started:
            ray.shutdown()
    with stage("demo [5/6] evaluate-rm (RM vs chance, a CNN and the Bayes ceiling)"):
        ev = evaluate_rm(cfg, lay.root, out / "rm", out / "rm_eval.json")
    from caig_ray.jobs.train import train

    t = time.perf_counter()
    with stage(f"demo [6/6] train: the online DPO+PCPO loop ({cfg.online.rounds} rounds)"):
        online = train(cfg, out / "online", str(out / "pm"), str(out / "rm"), str(lay.catalog))
    online_s = time.perf_counter() - t
    bar_chart({"chance": 0.5, "CNN baseline": ev["cnn_baseline_accuracy_logged"],
               "RM": ev["rm_accuracy_logged"], "RM debiased": ev["rm_debiased_accuracy_logged"],
               "Bayes ceiling\n(test pairs)": ev["bayes_ceiling_test_pairs"]}, plots / "rm_accuracy.png",
              "held-out pairwise accuracy vs logged order", ylim=(0.4, 1.0))
    return {
        # rm_eval.json's names for rm_eval.json's numbers
        **{k: ev[k] for k in ("rm_accuracy_logged", "rm_debiased_accuracy_logged", "rm_accuracy_true",
                              "cnn_baseline_accuracy_logged", "bayes_ceiling_test_pairs", "n_test_pairs",
                              "rm_title_blanked_accuracy_logged", "mcnemar_rm_vs_cnn")},
        # E1 of the paper reproduction for this world (docs/results.md): the RM against the image-only CNN
        # on the same held-out band pairs, and E2's title-blanked RM
        "rm_pair_accuracy": ev["rm_accuracy_logged"], "rm_baseline_accuracy": ev["cnn_baseline_accuracy_logged"],
        "rm_minus_baseline": ev["rm_minus_cnn_logged"], "rm_title_blanked_minus_baseline": ev["rm_title_blanked_minus_cnn_logged"],
        "rm_train_s": rm_s, "rm_zero_stage": rm["zero_stage"],
        "pm_scene_word_share_before": pm["scene_word_share_before"],
        "pm_scene_word_share_after": pm["scene_word_share_after"], "pm_pretrain_s": pm_s,
        "pm_path": "pm", "rm_path": "rm",  # paths relative to the demo folder
        **{k: online[k] for k in (
            "true_ctr_by_round", "match_rate_by_round", "rm_win_rate_by_round", "eval_after_rounds",
            "pairs_planned", "pairs_rendered", "pairs_scored", "pairs_trained", "pairs_skipped", "pairs_lost",
            "pairs_duplicated", "pairs_skipped_tie", "pairs_skipped_duplicate", "renderer_pool_size_max", "steps",
            "mismatch_share_by_round", "base_mismatch_share_by_round", "mismatch_share_by_category",
            "base_mismatch_share_by_category", "eval_samples")},
        "true_ctr_lift": online.get("true_ctr_lift"), "online_job_s": online_s,
        "online_wall_s": online.get("online_wall_s", online.get("wall_s")), "online_dir": "online",
        "tuned_policy_path": relative_path(online["policy_path"], out),
    }


if __name__ == "__main__":
    sys.exit(main())
