"""``caig-ray report RUN_DIR``: (re)write the self-contained ``report.html`` of an online run
(also written at the end of every ``caig-ray train``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from caig_ray.report import write_run_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caig-ray report", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--per-round", type=int, default=12, help="pairs shown per round")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    run = Path(args.run_dir)
    if not (run / "pairs").is_dir():
        print(f"error: {run} is not an online run folder (no pairs/ in it)", file=sys.stderr)
        return 2
    print(write_run_report(run, args.per_round))
    return 0


if __name__ == "__main__":
    sys.exit(main())
