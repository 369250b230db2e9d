"""Evaluate the RM on held-out band pairs: ``python -m caig_ray.jobs.evaluate_rm`` / ``caig-ray evaluate-rm``.

Pairwise accuracy (as the paper measures) against the logged order and against the true order
(market oracle), next to chance, the RM with the product title blanked (what the text adds), an
image-only CNN baseline trained on the same pairs (with an exact McNemar test RM vs CNN), and the
market's Bayes ceiling on the same test pairs (``bayes_ceiling_test_pairs``; make-world's
``bayes_ceiling`` is over all band pairs). Written to ``rm_eval.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from caig_ray.config import CaigConfig
from caig_ray.data import DataError, load_log_image, read_click_logs
from caig_ray.pairs import mine_rm_pairs
from caig_ray.world import WorldLayout
from caig_ray.jobs._entry import add_config_args, model_arg, pick, run_job


def mcnemar(a_right: np.ndarray, b_right: np.ndarray) -> dict:
    """Exact McNemar test of two classifiers on the same pairs: ``a_only`` / ``b_only`` = pairs only A /
    only B gets right; ``p_two_sided`` = 2·P(Binomial(a_only + b_only, 1/2) <= min(a_only, b_only)), capped at 1."""
    from math import comb

    a_only, b_only = int(np.sum(a_right & ~b_right)), int(np.sum(~a_right & b_right))
    n = a_only + b_only
    tail = sum(comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2**n if n else 1.0
    p = min(1.0, 2 * tail)
    return {"a_only": a_only, "b_only": b_only, "p_two_sided": p}


def evaluate_rm(cfg: CaigConfig, world_dir: str | Path | None, rm_path: str | Path, out: str | Path) -> dict:
    from caig_ray.baselines import cnn_p_left, to_tensor, train_pair_cnn
    from caig_ray.models.reward import load_reward_model
    from caig_ray.models.folders import check_model_folder
    from caig_ray.scoring import PairScorer, PairToScore

    lay = WorldLayout(world_dir) if world_dir else None
    check_model_folder(rm_path, "--rm", kind="reward")
    # --world's logs win over data.click_logs; the Bayes ceiling needs a simulated world's true CTRs
    click_logs = Path(pick("--world", lay and lay.click_logs, "data.click_logs", cfg.data.click_logs))
    logs = read_click_logs(click_logs)
    truth = pq.read_table(lay.truth).column("true_ctr").to_pylist() if lay and lay.truth.is_file() else None
    tc = cfg.train_rm
    # test: the market band, as the paper evaluates; the baseline trains on the RM's training pairs
    test = [p for p in mine_rm_pairs(logs, cfg.market.min_impressions, tuple(cfg.market.band),
                                     tc.test_fraction, tc.seed) if p["split"] == "test"]
    train = [p for p in mine_rm_pairs(logs, cfg.market.min_impressions, tuple(tc.train_band or cfg.market.band),
                                      tc.test_fraction, tc.seed) if p["split"] == "train"]
    if not test:
        raise DataError(f"no held-out band pairs in {click_logs}: raise test_fraction or the world size")
    size = cfg.reward.pair_image_size
    titles = logs.column("title").to_pylist() if "title" in logs.column_names else [""] * logs.num_rows
    img = lambda r: load_log_image(logs, r, click_logs.parent).resize((size, size))  # noqa: E731
    logged = np.array([p["label"] for p in test])
    result = {"n_train_pairs": len(train), "n_test_pairs": len(test), "chance": 0.5}

    t0 = time.perf_counter()
    driver = cfg.resources.driver_models
    model, processor = load_reward_model(rm_path, dtype=driver.dtype, device=driver.device)
    scored = PairScorer(model, processor, batch_size=32, device=driver.device).score(
        [PairToScore(img(p["left_row"]), img(p["right_row"]), titles[p["left_row"]]) for p in test])
    result["rm_score_s"] = time.perf_counter() - t0
    pred = (np.array(scored["p_left"]) < 0.5).astype(int)
    pred_db = (np.array(scored["p_left_debiased"]) < 0.5).astype(int)
    result["rm_accuracy_logged"] = float((pred == logged).mean())
    result["rm_debiased_accuracy_logged"] = float((pred_db == logged).mean())
    # the same pairs with the product text blanked: what the RM gets from the title (E2, docs/results.md)
    blank = PairScorer(model, processor, batch_size=32, device=driver.device).score(
        [PairToScore(img(p["left_row"]), img(p["right_row"]), "") for p in test])
    pred_blank = (np.array(blank["p_left"]) < 0.5).astype(int)
    result["rm_title_blanked_accuracy_logged"] = float((pred_blank == logged).mean())

    t0 = time.perf_counter()
    cnn = train_pair_cnn(to_tensor([img(p["left_row"]) for p in train]), to_tensor([img(p["right_row"]) for p in train]),
                         __import__("torch").tensor([p["label"] for p in train]), seed=tc.seed)
    cnn_pred = (cnn_p_left(cnn, to_tensor([img(p["left_row"]) for p in test]),
                           to_tensor([img(p["right_row"]) for p in test])) < 0.5).astype(int)
    result["cnn_train_s"] = time.perf_counter() - t0
    result["cnn_baseline_accuracy_logged"] = float((cnn_pred == logged).mean())
    result["rm_minus_cnn_logged"] = result["rm_accuracy_logged"] - result["cnn_baseline_accuracy_logged"]
    result["rm_title_blanked_minus_cnn_logged"] = (result["rm_title_blanked_accuracy_logged"]
                                                   - result["cnn_baseline_accuracy_logged"])
    result["mcnemar_rm_vs_cnn"] = mcnemar(pred == logged, cnn_pred == logged)

    if truth is not None:
        true = np.array([int(truth[p["left_row"]] < truth[p["right_row"]]) for p in test])
        result["bayes_ceiling_test_pairs"] = float((true == logged).mean())  # these test pairs only
        result["rm_accuracy_true"] = float((pred == true).mean())
        result["rm_debiased_accuracy_true"] = float((pred_db == true).mean())
        result["cnn_baseline_accuracy_true"] = float((cnn_pred == true).mean())
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caig-ray evaluate-rm", description=__doc__)
    add_config_args(p, overwrite=True)
    p.add_argument("--world", default=None, help="a make-world folder: its click logs (over data.click_logs) and its "
                                                "true CTRs (the Bayes ceiling)")
    p.add_argument("--rm", default=None, help="trained RM folder or object-store URI (train-rm --out); default: "
                                             "reward.model_path")
    p.add_argument("--out", default="rm_eval.json", help="the JSON file the result is written to")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return run_job(args, lambda cfg, out: evaluate_rm(
        cfg, args.world, pick("--rm", model_arg(args.rm, cfg), "reward.model_path", model_arg(cfg.reward.model_path, cfg)),
        out.local))


if __name__ == "__main__":
    sys.exit(main())
