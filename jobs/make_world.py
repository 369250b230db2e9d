"""Write the simulated ad market and the tiny model folders: ``python -m caig_ray.jobs.make_world``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from caig_ray.config import ConfigError, load_config
from caig_ray.data import DataError
from caig_ray.storage import resolve_output
from caig_ray.world import make_world


def parse_args(argv):
    p = argparse.ArgumentParser(prog="caig-ray make-world", description=__doc__)
    p.add_argument("--preset", default="quick", help="preset name (quick, demo, gpu-cluster)")
    p.add_argument("--config", default=None, help="a YAML config file (instead of --preset)")
    p.add_argument("--storage", default=None, help="where outputs live (see caig-ray train --help); --out is under it")
    p.add_argument("--out", required=True, help="folder to write the world to")
    p.add_argument("--no-models", action="store_true", help="market data only, no tiny models")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = load_config(args.config or args.preset, overrides={"storage": args.storage} if args.storage else None)
        out = resolve_output(cfg.storage, args.out)
        t = time.perf_counter()
        summary = make_world(cfg, out.local, models=not args.no_models)
        out.upload()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary["wall_s"] = time.perf_counter() - t
    print(json.dumps(summary, indent=1))
    print(f"world written to {out} in {summary['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
