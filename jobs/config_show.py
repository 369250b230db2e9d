"""``caig-ray config show --preset NAME`` (or ``--config FILE``): the resolved config -- every
default filled in -- and a plan of where each job's roles run and the GPUs it asks Ray for."""

from __future__ import annotations

import argparse
import sys

import yaml

from caig_ray.config import CaigConfig, ConfigError, load_config

# which roles each job places (resources.<role>), in the order a cluster user runs the jobs
JOB_ROLES = {
    "pretrain-pm": ("pretraining", "driver_models"),
    "train-rm": ("reward_training",),
    "evaluate-rm": ("driver_models",),
    "train": ("policy", "renderers", "scorers"),
    "generate": ("generators", "renderers", "scorers"),
    "serve": ("serve",),
}


def _count(role: str, placement) -> tuple[str, float, float]:
    """(how many, GPUs, CPUs) a role asks for at most."""
    n = getattr(placement, "num_workers", None) or getattr(placement, "max_size", None) \
        or getattr(placement, "max_replicas", None) or 1
    return f"{n}", n * placement.num_gpus, n * placement.num_cpus


def plan(cfg: CaigConfig) -> str:
    """A table: job, role, processes, device, dtype, GPUs and CPUs at most."""
    rows = [("job", "role", "processes", "device", "dtype", "GPUs (max)", "CPUs (max)")]
    for job, roles in JOB_ROLES.items():
        for role in roles:
            pl = getattr(cfg.resources, role)
            n, gpus, cpus = _count(role, pl)
            rows.append((job, role, n, pl.device, pl.dtype, f"{gpus:g}", f"{cpus:g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caig-ray config", description=__doc__)
    p.add_argument("action", choices=["show"])
    p.add_argument("--preset", default="quick", help="preset name (quick, demo, gpu-cluster)")
    p.add_argument("--config", default=None, help="a YAML config file (instead of --preset)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config or args.preset)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    print("\n# where each job runs (resources.*):")
    print("\n".join("# " + line for line in plan(cfg).splitlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
