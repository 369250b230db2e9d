"""How every entrypoint joins Ray: under ``ray job submit`` (RAY_ADDRESS set) it attaches to that
cluster; run locally it starts a private local instance -- never an unrelated running cluster."""

from __future__ import annotations

import os

from caig_ray.jobs._signals import stop_on_sigterm
from caig_ray.storage import OutputInUse


def init_ray(num_cpus: int | None = None) -> bool:
    """Initialise Ray if needed; returns True when this call started it (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)  # resources are the cluster's own
        stop_on_sigterm()
        return True
    # A private local instance. Its processes must know its address: Ray Train's helpers look the
    # cluster up themselves (the state API), and with another Ray on the host they find two and fail
    # ("Found multiple active Ray instances"). So the GCS port is chosen here and RAY_ADDRESS is in the
    # environment the instance's processes start with -- and only theirs: this process's environment
    # is restored, so a later init_ray here starts a fresh instance again.
    import socket

    from ray._private.services import get_node_ip_address

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    env = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{get_node_ip_address()}:{port}",
           # a single local node has no preemption to watch; the watcher's actor logs an error-level
           # line about its restartable arguments at every Ray Train start (Ray's own, not a failure)
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    finally:
        for k, v in saved.items():
            if k == "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" and v is None:
                continue  # read by Ray Train in this process when a trainer starts: kept for this instance
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    stop_on_sigterm()
    return True


def fit_to_folder(train_func, loop, *, run_name: str, placement, max_failures: int, storage,
                  out, datasets: dict | None = None) -> dict:
    """Run a Ray Train ``TorchTrainer`` (gloo on CPU, NCCL on GPU) and copy its final checkpoint to
    ``out`` (the entrypoint refused a used ``out`` unless ``--overwrite`` asked to replace it); returns
    the last reported metrics plus ``wall_s``. ``storage`` (a ``caig_ray.storage.Output``) is Ray Train's
    ``storage_path``: a folder, or the object store itself (Ray Train uploads its checkpoints there).
    ``run_name`` (``<name>-<run id>``) is the run's name there: Ray Train restores a run it finds under
    its name in storage, so each job is its own run, never an earlier job's checkpoint picked up again."""
    import functools
    import shutil
    import time
    from pathlib import Path

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    fs, fs_path = storage.filesystem() if storage.staged else (None, str(storage.local))
    from caig_ray.ds import WORKER_ENV, backend

    trainer = TorchTrainer(
        # each worker runs train_func(loop): the typed loop config bound here, pickled to every worker
        functools.partial(train_func, loop), datasets=datasets,  # each worker: get_dataset_shard
        # one worker per rank, each with the role's placement (resources.reward_training / .pretraining)
        scaling_config=ScalingConfig(num_workers=placement.num_workers, use_gpu=placement.use_gpu,
                                     resources_per_worker={"CPU": placement.num_cpus,
                                                           **({"GPU": placement.num_gpus} if placement.use_gpu else {})},
                                     placement_strategy=placement.placement_strategy),
        torch_config=TorchConfig(backend=backend(placement.use_gpu)),
        run_config=RunConfig(name=run_name, storage_path=fs_path, storage_filesystem=fs, failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1), worker_runtime_env={"env_vars": dict(WORKER_ENV)}),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise result.error
    out = Path(out)
    if out.exists() and any(out.iterdir()):  # the entrypoint refused it, or cleared it for --overwrite
        raise OutputInUse(f"{out} already holds files: the trained model is not written over them")
    with result.checkpoint.as_directory() as d:
        shutil.copytree(d, out, dirs_exist_ok=True)
    return {**result.metrics, "wall_s": time.perf_counter() - t0}
