"""``caig-ray report RUN_DIR``: (re)write the self-contained ``report.html`` of an online run
(also written at the end of every ``caig-ray train``): the result first (true CTR tuned vs
pretrained with its 95% CI, match rate, RM win rate, the RM's accuracy vs the CNN baseline), then
the curves, the held-out products' ads (tuned vs pretrained) and the training pairs by round."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caig-ray report", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--per-round", type=int, default=12, help="training pairs shown per round")
    p.add_argument("--per-eval", type=int, default=24, help="held-out products shown (the last evaluation's)")
    p.add_argument("--rm-eval", help="the evaluate-rm result the headline quotes (default: rm_eval.json in the run "
                                     "folder or beside it, as caig-ray demo writes it)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    run = Path(args.run_dir)
    if not (run / "pairs").is_dir():
        print(f"error: {run} is not an online run folder (no pairs/ in it)", file=sys.stderr)
        return 2
    from caig_ray.report import write_run_report  # here: `report --help` loads no matplotlib

    if args.rm_eval and not Path(args.rm_eval).is_file():
        print(f"error: --rm-eval {args.rm_eval} is not a file", file=sys.stderr)
        return 2
    print(write_run_report(run, args.per_round, args.per_eval, args.rm_eval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
