"""Batch ad generation for a catalog: ``python -m caig_ray.jobs.generate`` / ``caig-ray generate``.

One streaming Ray Data pipeline (docs/online-loop.md, the driver is the control plane); the driver holds ids and counts, never the catalog,
an image or a model:

    catalog (dataplane/catalog.py: read lazily, validated in parallel; bad rows stop the job or go to
    rejects/)  --> Describer pool (resources.generators: the policy writes N descriptions a product)
    --> CandidateRenderer pool (resources.renderers: the N ads, one seed a product)
    --> CandidateRanker pool (resources.scorers: the N candidates ranked inside their row, every pair
    scored in both orders; the ranking code is Serve's /v1/rank's)

Between the stages a row is a ``ProductCandidates`` (caig_ray/rows.py), filled stage by stage.
    --> write_generated: ads/*.png and one parquet part per batch in candidates/ and best/, as it goes.

``--resume`` skips the products already written (a part is written whole or not at all, named by
its products, so a retried task rewrites the same part: each product is written exactly once).
``gallery.html`` shows the first products written.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from caig_ray.config import CaigConfig, ConfigError
from caig_ray.jobs._entry import add_config_args, model_arg, pick, run_job
from caig_ray.jobs._ray import init_ray
from caig_ray.storage import refuse_used

logger = logging.getLogger(__name__)


def write_generated(batch: pa.Table, out: str) -> pa.Table:
    """Ray Data map (a task): write a block of ranked ``ProductCandidates``' ads as PNGs, then its rows
    as one parquet part in ``best/`` and then ``candidates/`` (the part that marks the products done),
    and return counts."""
    from caig_ray.dataplane.catalog import safe_name
    from caig_ray.rows import ProductCandidates
    from caig_ray.storage import part_name, write_part

    out_dir, candidates, best = Path(out), [], []
    (out_dir / "ads").mkdir(parents=True, exist_ok=True)
    rows = ProductCandidates.from_table(batch)
    for r in rows:
        for k, (description, duplicate, ad, win_rate, ctr, rank) in enumerate(zip(
                r.descriptions, r.duplicate, r.ads, r.win_rate, r.ctr, r.rank, strict=True)):
            ad_path = f"ads/{safe_name(r.id)}_{k}.png"
            (out_dir / ad_path).write_bytes(ad)
            row = {"product_id": r.id, "catalog_row": r.row, "title": r.title, "candidate": k,
                   "description": description, "duplicate": duplicate, "seed": r.seed, "win_rate": win_rate,
                   "ctr": ctr, "rank": rank, "ad_path": ad_path}
            candidates.append(row)
            if rank == 0:
                best.append(row)
    name = part_name(sorted(r.id for r in rows))
    write_part(pa.Table.from_pylist(best), out_dir / "best", name)
    write_part(pa.Table.from_pylist(candidates), out_dir / "candidates", name)
    return pa.table({"products": [len(rows)], "candidates": [len(candidates)]})


def written_ids(out: Path) -> list[str]:
    """Product ids already written (resume); drops a ``best/`` part whose ``candidates/`` part was
    never written (the job stopped between the two)."""
    import pyarrow.dataset as pads

    cands = out / "candidates"
    for part in (out / "best").glob("*.parquet") if (out / "best").is_dir() else []:
        if not (cands / part.name).is_file():
            part.unlink()
    if not cands.is_dir() or not any(cands.glob("*.parquet")):
        return []
    ids = pads.dataset(str(cands), format="parquet").to_table(columns=["product_id"])["product_id"]
    return pc.unique(ids).to_pylist()


GALLERY_TIE_GAP = 0.01  # RM win rates closer than this (1 point), or printed the same, are a tie, not a "best"


def near_tie_places(win_rates: list[float], gap: float = GALLERY_TIE_GAP) -> list[tuple[int, bool]]:
    """Per candidate, in the order given: ``(place, tied)``. A candidate is clearly ahead of another when
    its win rate is higher by at least ``gap`` and the two print differently (``win rate 51.2%``);
    ``place`` = 1 + the candidates clearly ahead of it, ``tied`` = some other candidate is neither clearly
    ahead of it nor clearly behind it. The gallery calls a candidate "best" only at place 1 untied."""
    shown = [f"{100 * w:.1f}" for w in win_rates]

    def ahead(j: int, i: int) -> bool:
        return win_rates[j] - win_rates[i] >= gap - 1e-12 and shown[j] != shown[i]

    idx = range(len(win_rates))
    return [(1 + sum(ahead(j, i) for j in idx if j != i),
             any(not ahead(j, i) and not ahead(i, j) for j in idx if j != i)) for i in idx]


def write_gallery(out: Path, max_products: int = 200) -> None:
    """gallery.html: the first ``max_products`` products written, each with its candidates best first.
    Candidates whose win rates are within ``GALLERY_TIE_GAP`` of each other are marked as ties (a tie
    for #1 is not called best); descriptions are cleaned for display (``caig_ray.report.clean_text``)
    and marked where they were."""
    import pyarrow.dataset as pads

    from caig_ray.report import clean_text, shown_html

    best = pads.dataset(str(out / "best"), format="parquet").head(max_products).to_pylist()
    ids = pa.array([b["product_id"] for b in best], pa.string())
    table = pads.dataset(str(out / "candidates"), format="parquet").to_table(
        filter=pc.field("product_id").isin(ids)).to_pylist()
    cards = []
    for b in best:
        cands = sorted((r for r in table if r["product_id"] == b["product_id"]), key=lambda r: r["rank"])
        figs = []
        for r, (place, tied) in zip(cands, near_tie_places([r["win_rate"] for r in cands])):
            cls = "tie" if tied and place == 1 else "best" if place == 1 else "cand"
            mark = " (tie)" if tied else " best" if place == 1 else ""
            desc = shown_html(r["description"], "candidates/")
            alt = html.escape(clean_text(r["description"])[0], quote=True)
            figs.append(
                f'<figure class="{cls}"><img src="{html.escape(r["ad_path"])}" alt="{alt}">'
                f'<figcaption>#{place}{mark} · win rate {100 * r["win_rate"]:.1f}%'
                f'{" · duplicate" if r["duplicate"] else ""}<br>{desc}</figcaption></figure>')
        cards.append(f'<section><h2>{shown_html(b["title"])} <small>{shown_html(b["product_id"])}</small></h2>'
                     f'{"".join(figs)}</section>')
    (out / "gallery.html").write_text(
        "<!doctype html><meta charset=utf-8><title>caig-ray generated ads</title><style>"
        "body{font-family:sans-serif;margin:1em}section{margin-bottom:1.5em}figure{display:inline-block;"
        "width:170px;margin:4px;vertical-align:top;font-size:12px}img{width:160px;height:160px}"
        ".best img{outline:4px solid #2a2}.tie img{outline:4px dashed #a80}.cleaned .mark{color:#a60}</style>"
        "<h1>Generated ads, best first</h1>"
        f"<p>Ranked by RM win rate (mean debiased P(beats each other candidate)). Candidates whose win rates "
        f"differ by less than {100 * GALLERY_TIE_GAP:g} point (or print the same) are marked (tie), dashed "
        "outline: a tie for #1 is not called best. Descriptions marked [cleaned] had undecodable bytes or "
        "control characters removed for display.</p>" + "".join(cards), encoding="utf-8")


def _parts_rows(folder: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("*.parquet")) if folder.is_dir() else 0


def _at_least_one(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}: with no description there is nothing to render")
    return n


def generate_stages(ds, cfg: CaigConfig, policy: str, rm: str, n: int, seed: int):
    """Describe, render, score: the three model stages on their pools (``resources.generators``,
    ``renderers``, ``scorers``), built by the same helper as the online loop's (``map_pool``). Each stage
    takes whole blocks (a row group of 4 policy batches) and batches inside the actor
    (policy.generate_batch_size, renderer.batch_size, online.scorer_batch_size)."""
    from caig_ray.actors.describer import Describer
    from caig_ray.actors.renderer import CandidateRenderer
    from caig_ray.actors.scorer import CandidateRanker
    from caig_ray.dataplane.stream import map_pool, map_renderers

    res = cfg.resources
    ds = map_pool(ds, Describer, res.generators, batch_format="pyarrow",
                  fn_constructor_args=(policy, cfg.policy, n, seed,
                                       res.generators.device, res.generators.dtype))
    ds = map_renderers(ds, cfg.renderer, res.renderers, None, None, batch_format="pyarrow", stage=CandidateRenderer)
    return map_pool(ds, CandidateRanker, res.scorers, batch_format="pyarrow", fn_constructor_kwargs={
        "model_path": rm, "batch_size": cfg.online.scorer_batch_size, "dtype": res.scorers.dtype,
        "device": res.scorers.device})


def generate(cfg: CaigConfig, catalog: str | Path, out: str | Path, policy: str, rm: str, n: int = 4,
             seed: int = 0, resume: bool = False, on_bad_rows: str = "stop", image_root: str | None = None) -> dict:
    import ray

    from caig_ray.dataplane.catalog import ValidCatalogSource, validate_catalog
    from caig_ray.models.renderer import check_sd_folders
    from caig_ray.models.folders import check_model_folder

    t0 = time.perf_counter()
    if n < 1:
        raise ConfigError(f"generate: n={n} descriptions per product; give at least 1")
    # every model folder is checked before anything is read, sampled or rendered
    check_model_folder(policy, "--policy", kind="policy")
    check_model_folder(rm, "--rm", kind="reward")
    if cfg.renderer.kind == "diffusers":
        check_sd_folders(cfg.renderer)
    out = Path(out)
    if not resume and _parts_rows(out / "candidates"):
        raise ConfigError(f"{out} already holds generated ads: pass --resume to add the products not written "
                          "yet, or give an empty --out")
    out.mkdir(parents=True, exist_ok=True)
    # what these ads are made from: a --resume with other models or settings would mix two runs' ads
    inputs = {"catalog": str(catalog), "policy": str(policy), "rm": str(rm), "n": n, "seed": seed,
              "renderer": cfg.renderer.model_dump(mode="json"), "policy_config": cfg.policy.model_dump(mode="json")}
    record = out / "generate_inputs.json"
    if resume and record.is_file():
        before = json.loads(record.read_text())
        changed = sorted(k for k in inputs if before.get(k) != inputs[k])
        if changed:
            raise ConfigError(f"--resume: {out} holds ads made with other {', '.join(changed)} ({record}): give the "
                              "same inputs to add to them, or a new --out")
    record.write_text(json.dumps(inputs, indent=1))
    started = init_ray()
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # progress: the log lines below
        # a block (a row group of 4 policy batches) is the unit that streams from stage to stage
        check = validate_catalog(catalog, out / "catalog", on_bad_rows, image_root,
                                 rows_per_group=4 * cfg.policy.generate_batch_size)
        done = written_ids(out) if resume else []
        todo = check.valid_rows - len(done)
        logger.info("generate: %d valid products (%d rejected), %d already written, %d to go", check.valid_rows,
                    check.rejected_rows, len(done), todo)
        skip = ray.put(pa.array(done, pa.string())) if done else None
        ds = ray.data.read_datasource(ValidCatalogSource(check.valid, skip), num_cpus=0.25)
        ds = generate_stages(ds, cfg, policy, rm, n, seed)
        ds = ds.map_batches(write_generated, fn_kwargs={"out": str(out)}, batch_format="pyarrow", batch_size=None,
                            num_cpus=0.25)
        written = 0
        last = time.perf_counter()
        for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            written += sum(b["products"].to_pylist())
            if time.perf_counter() - last > 10 or written == todo:
                last = time.perf_counter()
                logger.info("generate: %d/%d products written (%.1f products/s)", written, todo,
                            written / (last - t0))
    finally:
        if started:
            ray.shutdown()
    write_gallery(out)
    summary = {"products": _parts_rows(out / "best"), "candidates": _parts_rows(out / "candidates"),
               "written_this_run": written, "already_written": len(done), "catalog_rows": check.rows,
               "rejected_rows": check.rejected_rows, "rejects": str(check.rejects) if check.rejected_rows else None,
               "n_per_product": n, "wall_s": time.perf_counter() - t0,
               "products_per_s": written / (time.perf_counter() - t0)}
    (out / "generate_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caig-ray generate", description=__doc__)
    add_config_args(p)
    p.add_argument("--catalog", default=None, help="CAIG JSON, parquet, or a folder of images; default: data.catalog")
    p.add_argument("--image-root", default=None, help="where relative image paths are looked up (default: the "
                   "catalog's folder, then its parent)")
    p.add_argument("--on-bad-rows", choices=("stop", "reject"), default="stop",
                   help="stop: a bad row stops the job before anything is generated; reject: go on without it. "
                        "Either way every bad row is listed, with its reason, in OUT/catalog/rejects/")
    p.add_argument("--resume", action="store_true", help="add the products --out does not hold yet")
    p.add_argument("--out", required=True, help="a new folder (a used one is refused), or an earlier run's with --resume")
    p.add_argument("--policy", required=True, help="prompt-model folder or object-store URI (pretrain-pm --out, or a "
                                                 "run's <run>/policy)")
    p.add_argument("--rm", default=None, help="reward-model folder or object-store URI (train-rm --out); default: "
                                             "reward.model_path")
    p.add_argument("--n", type=_at_least_one, default=4, help="descriptions per product (>= 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    def job(cfg: CaigConfig, out) -> dict:
        catalog = pick("--catalog", args.catalog, "data.catalog", cfg.data.catalog)
        rm = pick("--rm", model_arg(args.rm, cfg), "reward.model_path", model_arg(cfg.reward.model_path, cfg))
        if not args.resume:
            refuse_used(out, "pass --resume to add the products it does not hold yet, or give a new --out")
        if args.resume and out.staged:  # what an earlier run uploaded tells which products are written
            out.child("candidates").download()
            out.child("best").download()
            out.child("generate_inputs.json").download()
        return generate(cfg, catalog, out.local, model_arg(args.policy, cfg), rm, args.n, args.seed, args.resume,
                        args.on_bad_rows, args.image_root)

    return run_job(args, job)


if __name__ == "__main__":
    sys.exit(main())
