"""Write the simulated ad market and the tiny model folders: ``python -m caig_ray.jobs.make_world``."""

from __future__ import annotations

import argparse
import sys
import time

from caig_ray.jobs._entry import add_config_args, run_job
from caig_ray.world import make_world


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caig-ray make-world", description=__doc__)
    add_config_args(p, overwrite=True)
    p.add_argument("--out", required=True, help="folder to write the world to (a used one is refused unless --overwrite)")
    p.add_argument("--no-models", action="store_true", help="market data only, no tiny models")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    def job(cfg, out) -> dict:
        t = time.perf_counter()
        summary = make_world(cfg, out.local, models=not args.no_models)
        summary["wall_s"] = time.perf_counter() - t
        print(f"world written to {out} in {summary['wall_s']:.1f} s", file=sys.stderr)
        return summary

    return run_job(args, job)


if __name__ == "__main__":
    sys.exit(main())
