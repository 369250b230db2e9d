"""The driver is the control plane: its memory must not grow with the catalog.

    python bench/scale.py --world /tmp/scale_world [--generate 1000 10000 50000]
                          [--validate 1000 100000 1000000] [--work /tmp/caig_scale]

Builds catalogs of each size from a world's products (``--world``: a ``make-world`` folder, written
with the quick preset if it is missing; its tiny policy and RM are the models): parquet, images by
path, the same few hundred image files reused (``image`` = ``images/<k>.png`` relative to the
catalog), every row its own id and title; the world's own config (renderer, image sizes, pools).
Each measurement runs in a fresh driver process (a child
of this script that starts its own local Ray) and reports that process's own peak RSS
(``getrusage(RUSAGE_SELF)``: the driver alone, not Ray's workers):

- validate: ``caig_ray.dataplane.catalog.validate_catalog`` (Ray Data reads and validates; every image decoded);
- generate: ``caig_ray.jobs.generate.generate`` with N=2 (procedural renderer, the world's tiny PM and RM).

Writes bench/results/scale.json with rows/s, products/s, the peak RSS of each run and
``driver_rss_ratio_largest_over_smallest`` (of the generate runs; the same ratio of the validate
runs as ``validate_driver_rss_ratio_largest_over_smallest``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 300


def make_catalog(world: Path, rows: int, folder: Path) -> Path:
    """``folder/catalog.parquet`` of ``rows`` products over at most N_IMAGES image files, written in
    chunks (this process never holds the rows)."""
    from caig_ray.data import read_catalog
    from caig_ray.world import WorldLayout

    path = folder / "catalog.parquet"
    if path.is_file() and pq.ParquetFile(path).metadata.num_rows == rows:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    products = read_catalog(WorldLayout(world).catalog)[:N_IMAGES]
    (folder / "images").mkdir(exist_ok=True)
    for k, p in enumerate(products):
        p.image.save(folder / "images" / f"{k}.png")
    schema = pa.schema([("id", pa.string()), ("image", pa.string()), ("new_caption", pa.string()),
                        ("category", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 50_000):
            ks = range(start, min(rows, start + 50_000))
            writer.write_table(pa.Table.from_pylist([
                {"id": f"p{i:08d}", "image": f"images/{i % len(products)}.png",
                 "new_caption": f"{products[i % len(products)].title} #{i}",
                 "category": products[i % len(products)].category} for i in ks], schema), row_group_size=10_000)
    return path


def child(args) -> None:
    """One measured driver: run the job, print its JSON line (wall time, counts, own peak RSS)."""
    import logging

    import ray

    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    if args.child == "validate":
        from caig_ray.dataplane.catalog import validate_catalog

        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        check = validate_catalog(args.catalog, args.out)
        ray.shutdown()
        result = {"rows": check.rows, "valid_rows": check.valid_rows}
    else:
        from caig_ray.config import load_config
        from caig_ray.world import WorldLayout
        from caig_ray.jobs.generate import generate

        lay = WorldLayout(args.world)
        summary = generate(load_config(lay.config, preset="none"), args.catalog, args.out, str(lay.policy), str(lay.reward), n=2)
        result = {"rows": summary["products"], "candidates": summary["candidates"]}
    wall = time.perf_counter() - t0
    result.update(wall_s=wall, rows_per_s=result["rows"] / wall,
                  driver_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(result), flush=True)


def measure(kind: str, rows: int, world: Path, work: Path) -> dict:
    catalog = make_catalog(world, rows, work / f"catalog_{rows}")
    out = work / f"{kind}_{rows}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--catalog", str(catalog), "--out", str(out),
                           "--world", str(world)], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} {rows}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    result = {"kind": kind, "catalog_rows": rows, **json.loads(lines[-1][len("RESULT "):])}
    print(f"{kind:8s} {rows:>9,d} rows: {result['wall_s']:7.1f} s, {result['rows_per_s']:8.1f} rows/s, "
          f"driver peak RSS {result['driver_peak_rss_mb']:6.0f} MB", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="/tmp/caig_scale_world")
    p.add_argument("--work", default="/tmp/caig_scale")
    p.add_argument("--generate", type=int, nargs="*", default=[1000, 10000, 50000])
    p.add_argument("--validate", type=int, nargs="*", default=[1000, 100000, 1000000])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    p.add_argument("--child", choices=("validate", "generate"), help=argparse.SUPPRESS)
    p.add_argument("--catalog", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    world, work = Path(args.world), Path(args.work)
    from caig_ray.world import WorldLayout

    if not WorldLayout(world).catalog.is_file():
        from caig_ray.config import load_config
        from caig_ray.world import make_world

        make_world(load_config("quick"), world, progress=False)
    validate, generate = [], []

    def ratio(runs):
        return runs[-1]["driver_peak_rss_mb"] / runs[0]["driver_peak_rss_mb"] if len(runs) > 1 else None

    def write() -> dict:  # after every measurement: an interrupted bench keeps what it measured
        result = {"machine": f"{os.cpu_count()} CPU cores, no GPU", "images_reused": N_IMAGES, "n_per_product": 2,
                  "validate": validate, "generate": generate,
                  "driver_rss_ratio_largest_over_smallest": ratio(generate),
                  "validate_driver_rss_ratio_largest_over_smallest": ratio(validate)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        return result

    for n in args.validate:
        validate.append(measure("validate", n, world, work))
        write()
    for n in args.generate:
        generate.append(measure("generate", n, world, work))
        result = write()
    print(f"driver RSS largest/smallest: generate {result['driver_rss_ratio_largest_over_smallest']}, "
          f"validate {result['validate_driver_rss_ratio_largest_over_smallest']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    if "--child" not in sys.argv:
        print(f"bench took {time.perf_counter() - started:.0f} s")
