"""Bounded load on the live scoring endpoint, batched vs ``max_batch_size=1``, side by side.

    python bench/serve_load.py --rm runs/demo/rm [--requests 200] [--concurrency 16]

Two applications of the same RM run in one local Serve instance on 127.0.0.1 (``/batched`` and
``/single``); rounds alternate between them so machine noise hits both alike. Loopback only; a
fixed number of requests at a fixed concurrency. Writes bench/results/serve_load.json.

    python bench/serve_load.py --backpressure --rm runs/demo/rm [--burst 64] [--hold 8] [--serve-queue 8]

Back-pressure: one burst of ``--burst`` simultaneous requests against each variant in turn, one
replica each, the same ``--hold`` requests held at once: ``counter`` (the app as deployed: its own
admission counter, ``serve.max_queued_requests``) and ``serve`` (the counter off; Serve's own
``max_queued_requests`` deployment option with ``max_ongoing_requests=--hold`` and
``backpressure_config.retry_after_s=1``). For each: statuses counted, a 503's body and headers, whether
that 503 meets the documented contract (503, the ErrorBody JSON, Retry-After), rejection latencies.
Writes bench/results/serve_backpressure.json.
"""

import argparse
import asyncio
import base64
import io
import json
import socket
import statistics
import sys
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


def _meets_contract(status: int, headers, body: bytes) -> dict:
    """The documented 503: status 503, an ``ErrorBody`` JSON body, a Retry-After header."""
    from caig_ray.serve_api import ErrorBody

    try:
        ErrorBody.model_validate_json(body)
        json_body = True
    except ValueError:
        json_body = False
    return {"status_503": status == 503, "error_body_json": json_body, "retry_after": "retry-after" in headers}


async def _burst(url: str, bodies: list[dict]) -> list[dict]:
    """Every body at once; each reply's status, latency from the burst's start, headers and body."""
    async def one(client, body, t0):
        r = await client.post(url, json=body)
        return {"status": r.status_code, "t_s": time.perf_counter() - t0, "headers": dict(r.headers),
                "body": r.content}

    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for body in bodies[:2]:  # warm the route and the model (a replica's first forward is slower)
            (await client.post(url, json=body)).raise_for_status()
        t0 = time.perf_counter()
        return await asyncio.gather(*[one(client, b, t0) for b in bodies])


def _summary(replies: list[dict]) -> dict:
    def ms(xs):
        xs = sorted(xs)
        return None if not xs else {"n": len(xs), "min_ms": 1000 * xs[0], "p50_ms": 1000 * xs[len(xs) // 2],
                                    "p95_ms": 1000 * xs[min(len(xs) - 1, int(0.95 * len(xs)))], "max_ms": 1000 * xs[-1]}

    codes: dict[str, int] = {}
    for r in replies:
        codes[str(r["status"])] = codes.get(str(r["status"]), 0) + 1
    rejected = [r for r in replies if r["status"] == 503]
    one = rejected[0] if rejected else None
    return {"statuses": codes,
            "rejection_latency": ms([r["t_s"] for r in rejected]),
            "served_latency": ms([r["t_s"] for r in replies if r["status"] == 200]),
            "a_503": None if one is None else {
                "body": one["body"].decode("utf-8", "replace"), "headers": one["headers"],
                "contract": _meets_contract(one["status"], one["headers"], one["body"])},
            "every_503_meets_contract": all(all(_meets_contract(r["status"], r["headers"], r["body"]).values())
                                            for r in rejected) if rejected else None}


def backpressure(args, port: int) -> dict:
    from caig_ray.config import config_from_dict
    from caig_ray.jobs.serve_rm import application

    rng = np.random.default_rng(0)
    bodies = [{"product": {"title": "red lipstick"}, "image_a": _png_b64(rng), "image_b": _png_b64(rng)}
              for _ in range(args.burst)]
    base = {"reward": {"model_path": args.rm}, "resources": {"serve": {"min_replicas": 1, "max_replicas": 1,
                                                                       "num_cpus": 0.5}}}
    variants = {
        "counter": (config_from_dict({**base, "serve": {"max_batch_size": 8, "max_queued_requests": args.hold}},
                                     "bench"), {}),
        # the counter never fires (a bound far above the burst); Serve's proxy bounds instead
        "serve": (config_from_dict({**base, "serve": {"max_batch_size": 8, "max_queued_requests": 1_000_000}},
                                   "bench"),
                  {"max_ongoing_requests": args.hold, "max_queued_requests": args.serve_queue,
                   "backpressure_config": {"retry_after_s": 1}}),
    }
    out = {}
    for name, (full, options) in variants.items():
        serve.run(application(full, **options), name=name, route_prefix=f"/{name}")
        replies = asyncio.run(_burst(f"http://127.0.0.1:{port}/{name}/v1/score", bodies))
        after = httpx.post(f"http://127.0.0.1:{port}/{name}/v1/score", json=bodies[0], timeout=60).status_code
        serve.delete(name)
        out[name] = {"deployment_options": options or {"max_ongoing_requests": args.hold + 8,
                                                       "serve.max_queued_requests": args.hold},
                     **_summary(replies), "a_request_right_after": after}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rm", required=True)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--backpressure", action="store_true", help="the back-pressure bench instead (see above)")
    p.add_argument("--burst", type=int, default=64, help="--backpressure: requests sent at once")
    p.add_argument("--hold", type=int, default=8, help="--backpressure: requests one replica holds at once")
    p.add_argument("--serve-queue", type=int, default=8,
                   help="--backpressure: Serve's max_queued_requests (the proxy's queue) in the serve variant")
    p.add_argument("--out", default=None, help="default bench/results/serve_load.json "
                                               "(--backpressure: serve_backpressure.json)")
    args = p.parse_args()
    args.out = args.out or str(Path(__file__).parent / "results" /
                               ("serve_backpressure.json" if args.backpressure else "serve_load.json"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    if args.backpressure:
        variants = backpressure(args, port)
        serve.shutdown()
        ray.shutdown()
        import fastapi

        res = {"command": "python bench/serve_load.py " + " ".join(sys.argv[1:]),
               "burst": args.burst, "hold": args.hold, "device": "cpu (2 cores shared), loopback, 1 replica",
               "ray": ray.__version__, "fastapi": fastapi.__version__,
               "documented_503": "status 503, body ErrorBody JSON {detail: [{loc, msg, type}]}, Retry-After header",
               "variants": variants}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(json.dumps({n: {k: v[k] for k in ("statuses", "rejection_latency", "every_503_meets_contract")}
                          for n, v in variants.items()}, indent=1))
        return
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
