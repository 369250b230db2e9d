"""The shared shape of a job's ``main``: preset/config arguments, config overrides from flags, the
job itself, and bad config or data reported as one line on stderr with exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from caig_ray.config import CaigConfig, ConfigError, load_config
from caig_ray.data import DataError
from caig_ray.models.vlm import ModelFolderError
from caig_ray.storage import Output, resolve_output


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="quick", help="preset name (quick, demo, gpu-cluster)")
    p.add_argument("--config", default=None, help="a YAML config file (instead of --preset)")
    p.add_argument("--storage", default=None,
                   help="where every output lives (overrides the config's storage): a shared POSIX path or an "
                        "object-store URI (s3://bucket/prefix); --out is relative to it")


def run_job(args: argparse.Namespace, job: Callable[[CaigConfig, Output], dict], section: str | None = None,
            overrides: dict[str, Any] | None = None, upload: bool = True) -> int:
    """Load the config (flags that are set override ``section``), resolve ``--out`` under ``storage``,
    run ``job(cfg, out)``, upload ``out`` (object store), print the summary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        top = {"storage": args.storage} if getattr(args, "storage", None) else {}
        cfg = load_config(args.config or args.preset,
                          overrides={**({section: over} if over and section else {}), **top} or None)
        out = resolve_output(cfg.storage, args.out)
        summary = job(cfg, out)
        if upload:
            out.upload()
    except (ConfigError, DataError, ModelFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1, default=str))
    return 0
