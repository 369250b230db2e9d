"""``caig-ray config show --preset NAME`` (or ``--config FILE``): the resolved config -- every
default filled in -- and a plan of where each job's roles run and the GPUs it asks Ray for."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from caig_ray.config import PRESETS, CaigConfig, ConfigError, diff_from, load_config, load_config_described

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
    p.add_argument("--preset", default=None, help="preset name (quick, demo, gpu-cluster); with --config, the base "
                                                "of a file that names none (default: demo)")
    p.add_argument("--config", default=None, help="a YAML config file, layered on its `base:`")
    p.add_argument("--diff", action="store_true",
                   help="print only what differs from the base preset, under a `base:` line: a small config file "
                        "to edit (caig-ray config show --preset gpu-cluster --diff > my.yaml)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, where = load_config_described(args.config or args.preset or "demo",
                                           preset=args.preset if args.config else None)
        base = _base_preset(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.diff:
            layer = diff_from(CaigConfig, load_config(base).model_dump(mode="json") if base != "none"
                              else CaigConfig().model_dump(mode="json"), cfg.model_dump(mode="json"))
            print(f"# {where}: what differs from {'the field defaults' if base == 'none' else 'preset ' + base}")
            print(yaml.safe_dump({"base": base, **layer}, sort_keys=False), end="")
            return 0
        print(f"# {where}")
        print(yaml.safe_dump({"base": "none", **cfg.model_dump(mode="json")}, sort_keys=False), end="")
        print("\n# where each job runs (resources.*):")
        print("\n".join("# " + line for line in plan(cfg).splitlines()))
    except BrokenPipeError:  # `config show | head`: the reader has what it wanted
        sys.stdout = None  # nothing more is written (not even at interpreter exit)
    return 0


def _base_preset(args) -> str:
    """The preset the config ultimately layers on (``none``: the field defaults)."""
    if not args.config:
        return args.preset or "demo"
    raw = yaml.safe_load(open(args.config)) or {}
    base = raw.get("base") if isinstance(raw, dict) else None
    base = base or args.preset
    if base in PRESETS or base == "none":
        return base
    return _base_preset(argparse.Namespace(config=str((Path(args.config).parent / base).resolve()), preset=None))


if __name__ == "__main__":
    sys.exit(main())
