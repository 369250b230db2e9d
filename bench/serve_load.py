"""Bounded load on the live scoring endpoint, batched vs ``max_batch_size=1``, side by side.

    python bench/serve_load.py --rm runs/demo/rm [--requests 200] [--concurrency 16]

Two applications of the same RM run in one local Serve instance on 127.0.0.1 (``/batched`` and
``/single``); rounds alternate between them so machine noise hits both alike. Loopback only; a
fixed number of requests at a fixed concurrency. Writes bench/results/serve_load.json.
"""

import argparse
import asyncio
import base64
import io
import json
import socket
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import ray
from PIL import Image
from ray import serve

from caig_ray.jobs.serve_rm import build_app


def _png_b64(rng) -> str:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def _load(url: str, bodies: list[dict], concurrency: int) -> dict:
    sem, lat = asyncio.Semaphore(concurrency), []

    async def one(client, body):
        async with sem:
            t = time.perf_counter()
            r = await client.post(url, json=body)
            r.raise_for_status()
            lat.append(time.perf_counter() - t)

    async with httpx.AsyncClient(timeout=120) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*[one(client, b) for b in bodies])
        wall = time.perf_counter() - t0
    lat.sort()
    return {"rps": len(bodies) / wall, "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rm", required=True)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    where = {"serve": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5}}
    serve.run(build_app({"reward": {"model_path": args.rm}, "serve": {"max_batch_size": 16}, "resources": where}),
              name="batched", route_prefix="/batched")
    serve.run(build_app({"reward": {"model_path": args.rm}, "serve": {"max_batch_size": 1}, "resources": where}),
              name="single", route_prefix="/single")
    rng = np.random.default_rng(0)
    bodies = [{"product": {"title": "red lipstick"}, "image_a": _png_b64(rng), "image_b": _png_b64(rng)}
              for _ in range(args.requests)]
    runs = {"batched": [], "single": []}
    for _ in range(args.rounds):
        for name in runs:
            runs[name].append(asyncio.run(_load(f"http://127.0.0.1:{port}/{name}/v1/score", bodies,
                                                args.concurrency)))
    serve.shutdown()
    ray.shutdown()
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    res = {"requests": args.requests, "concurrency": args.concurrency, "rounds": args.rounds,
           "device": "cpu (2 cores), loopback", **med,
           "rps_ratio_batched_over_single": med["batched"]["rps"] / med["single"]["rps"], "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
