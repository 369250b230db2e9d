"""Batch ad generation for a catalog: ``python -m jobs.generate`` / ``caig-ray generate``.

For each product the policy writes N descriptions, a Ray Data renderer pool (autoscaling actor
pool) renders them -- the same seed for every candidate of a product -- and the RM ranks them
(round robin of position-debiased pairwise scores). Writes ``candidates.parquet`` (every
candidate with its description, seed, scores and rank), ``best.parquet``, ``ads/*.png`` and
``gallery.html``.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from caig_ray.config import CaigConfig, ConfigError
from caig_ray.data import read_catalog
from caig_ray.imaging import png_bytes
from jobs._entry import add_config_args, run_job
from jobs._ray import init_ray


def write_descriptions(cfg: CaigConfig, policy_path: str, products, n: int, seed: int) -> list[dict]:
    """One row per candidate: the policy's N samples per product (duplicates kept and marked)."""
    from caig_ray.models.policy import load_policy
    from caig_ray.policy_ops import as_image, generate_descriptions
    from caig_ray.prompts import pm_instruction

    driver = cfg.resources.driver_models
    model, processor = load_policy(policy_path, driver.dtype, driver.device)
    model.eval()
    rows, bs = [], 16
    for start in range(0, len(products), bs):
        chunk = products[start:start + bs]
        gen = generate_descriptions(model, processor, [as_image(p.image, cfg.policy.image_size) for p in chunk],
                                    [pm_instruction(p.title, p.attributes) for p in chunk], n,
                                    cfg.policy.temperature, seed + start, cfg.policy.max_new_tokens,
                                    device=driver.device)
        for i, (p, g) in enumerate(zip(chunk, gen)):
            for k, (d, dup) in enumerate(zip(g["descriptions"], g["duplicate"])):
                rows.append({"product_id": p.id, "title": p.title, "candidate": k, "description": d,
                             "duplicate": dup, "seed": seed + start + i, "product_image": png_bytes(p.image)})
    return rows


def render_candidates(cfg: CaigConfig, rows: list[dict]) -> list[dict]:
    """Render every candidate on the ``resources.renderers`` pool."""
    import ray

    from actors.stream import map_renderers

    return map_renderers(ray.data.from_items(rows), cfg.renderer, cfg.resources.renderers,
                         cfg.renderer.batch_size).take_all()


def rank_candidates(cfg: CaigConfig, rm_path: str, rows: list[dict]) -> list[dict]:
    """Per product: win_rate = mean debiased P(beats each other candidate); rank 0 = best."""
    import io

    from PIL import Image

    from actors.scorer import RewardScorer
    from caig_ray.scoring import PairToScore

    driver = cfg.resources.driver_models
    scorer = RewardScorer(rm_path, device=driver.device, dtype=driver.dtype)
    by_product: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_product[r["product_id"]].append(r)
    for cands in by_product.values():
        cands.sort(key=lambda r: r["candidate"])
        imgs = [Image.open(io.BytesIO(r["ad"])).convert("RGB") for r in cands]
        idx = [(i, j) for i in range(len(cands)) for j in range(i + 1, len(cands))]
        wins = [0.0] * len(cands)
        if idx:
            res = scorer.score([PairToScore(imgs[i], imgs[j], cands[0]["title"]) for i, j in idx])
            for (i, j), p in zip(idx, res["p_left_debiased"]):
                wins[i] += p
                wins[j] += 1 - p
        for r, w in zip(cands, wins):
            r["win_rate"] = w / max(1, len(cands) - 1)
        for rank, r in enumerate(sorted(cands, key=lambda r: -r["win_rate"])):
            r["rank"] = rank
    return [r for cands in by_product.values() for r in cands]


def write_outputs(rows: list[dict], out: Path) -> dict:
    (out / "ads").mkdir(parents=True, exist_ok=True)
    for r in rows:
        r["ad_path"] = f"ads/{r['product_id']}_{r['candidate']}.png"
        (out / r["ad_path"]).write_bytes(r["ad"])
    table = [{k: v for k, v in r.items() if k not in ("product_image", "ad")} for r in rows]
    pq.write_table(pa.Table.from_pylist(table), out / "candidates.parquet")
    best = [r for r in table if r["rank"] == 0]
    pq.write_table(pa.Table.from_pylist(best), out / "best.parquet")
    cards = []
    for b in best:
        cands = sorted((r for r in table if r["product_id"] == b["product_id"]), key=lambda r: r["rank"])
        figs = "".join(
            f'<figure class="{"best" if r["rank"] == 0 else "cand"}"><img src="{html.escape(r["ad_path"])}" '
            f'alt="{html.escape(r["description"])}"><figcaption>#{r["rank"] + 1} · win {r["win_rate"]:.2f}'
            f'{" · duplicate" if r["duplicate"] else ""}<br>{html.escape(r["description"])}</figcaption></figure>'
            for r in cands)
        cards.append(f'<section><h2>{html.escape(b["title"])} <small>{b["product_id"]}</small></h2>{figs}</section>')
    (out / "gallery.html").write_text(
        "<!doctype html><meta charset=utf-8><title>caig-ray generated ads</title><style>"
        "body{font-family:sans-serif;margin:1em}section{margin-bottom:1.5em}figure{display:inline-block;"
        "width:170px;margin:4px;vertical-align:top;font-size:12px}img{width:160px;height:160px}"
        ".best img{outline:4px solid #2a2}</style><h1>Generated ads, best first</h1>" + "".join(cards))
    return {"products": len(best), "candidates": len(table)}


def _at_least_one(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}: with no description there is nothing to render")
    return n


def generate(cfg: CaigConfig, catalog: str | Path, out: str | Path, policy: str, rm: str, n: int = 4,
             seed: int = 0) -> dict:
    import ray

    from caig_ray.models.renderer import check_sd_folders
    from caig_ray.models.vlm import check_model_folder

    t0 = time.perf_counter()
    if n < 1:
        raise ConfigError(f"generate: n={n} descriptions per product; give at least 1")
    # every model folder is checked before anything is sampled or rendered
    check_model_folder(policy, "--policy", kind="policy")
    check_model_folder(rm, "--rm", kind="reward")
    if cfg.renderer.kind == "diffusers":
        check_sd_folders(cfg.renderer)
    products = read_catalog(catalog)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = write_descriptions(cfg, policy, products, n, seed)
    started = init_ray()
    try:
        rendered = render_candidates(cfg, rows)
    finally:
        if started:
            ray.shutdown()
    if len(rendered) != len(rows):
        raise RuntimeError(f"rendered {len(rendered)} candidates of {len(rows)}: some were lost")
    ranked = rank_candidates(cfg, rm, rendered)
    summary = write_outputs(ranked, out)
    summary.update(wall_s=time.perf_counter() - t0, n_per_product=n,
                   duplicates=sum(r["duplicate"] for r in ranked))
    (out / "generate_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caig-ray generate", description=__doc__)
    add_config_args(p)
    p.add_argument("--catalog", required=True, help="CAIG JSON or parquet catalog")
    p.add_argument("--out", required=True)
    p.add_argument("--policy", required=True, help="prompt-model folder (pretrain-pm or a trained policy)")
    p.add_argument("--rm", required=True, help="reward-model folder (train-rm --out)")
    p.add_argument("--n", type=_at_least_one, default=4, help="descriptions per product (>= 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return run_job(args, lambda cfg, out: generate(cfg, args.catalog, out.local, args.policy, args.rm, args.n,
                                                   args.seed))


if __name__ == "__main__":
    sys.exit(main())
