"""How every entrypoint joins Ray: under ``ray job submit`` (RAY_ADDRESS set) it attaches to that
cluster; run locally it starts a private local instance -- never an unrelated running cluster."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> bool:
    """Initialise Ray if needed; returns True when this call started it (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)  # resources are the cluster's own
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    return True
