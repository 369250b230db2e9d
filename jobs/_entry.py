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


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="quick", help="preset name (quick, demo, gpu-cluster)")
    p.add_argument("--config", default=None, help="a YAML config file (instead of --preset)")


def run_job(args: argparse.Namespace, job: Callable[[CaigConfig], dict], section: str | None = None,
            overrides: dict[str, Any] | None = None) -> int:
    """Load the config (flags that are set override ``section``), run ``job``, print its summary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        cfg = load_config(args.config or args.preset, overrides={section: over} if over and section else None)
        summary = job(cfg)
    except (ConfigError, DataError, ModelFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1, default=str))
    return 0
