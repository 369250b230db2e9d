"""The renderer pool on an autoscaling cluster, the way KubeRay runs it (issue 23, item 4).

    python bench/autoscaling.py [--backlog-blocks 24] [--latency 0.5] [--max-nodes 3] [--repeats 2] [--out ...]

A local autoscaling cluster (``ray.cluster_utils.AutoscalingCluster``'s fake multi-node provider,
autoscaler v2, what Ray 2.60 runs on KubeRay): a head with CPUs only, and a node type ``renderer`` -- {CPU: 1, GPU: 1, renderer: 1},
0..``--max-nodes`` nodes, released after ``--idle-timeout`` s idle -- that stands for
cluster/raycluster.yaml's renderer group (one GPU per pod, scales from zero). The GPU is a logical
resource (nothing runs on it): the renderer is the project's ``Renderer`` with the quick preset's
procedural renderer, and each image also waits ``renderer.simulated_latency_s`` (``--latency``), a
stand-in for a GPU's render time, so one actor per node is the bottleneck, as on the real cluster.

The pipeline is the project's renderer stage as ``PairStream`` builds it: a ``PairFeed`` actor, the
``FeedDatasource`` (read tasks wait on the feed), ``map_renderers`` on an ``ActorPoolStrategy(1, N)``
pool whose actors ask for what the gpu-cluster preset's renderers ask for ({GPU: 1, renderer: 1}).
Phases, one pipeline:

1. warm-up: one block; the pool's first actor needs a node, so the autoscaler adds the first one;
2. backlog: ``--backlog-blocks`` blocks put at once; measured: the lag from their arrival to the
   k-th renderer node alive, the k-th pool actor ALIVE, and the k-th actor *serving* (the driver
   has a rendered batch from it: the ``renderer_pid`` column), k = 1..N;
3. idle: nothing is fed for up to ``--idle`` s (until the pool and its nodes are back to
   ``min_size``); measured: the lag from the backlog's last block to the pool
   shrinking to ``min_size`` and the autoscaler releasing the nodes it no longer holds an actor on;
4. end: the last block; the dataset ends, its pool goes, and the lag to the last node released.

Two variants, ``--repeats`` times each, interleaved, each run on a fresh cluster: ``ray_data_pool`` -- the renderers on Ray Data's autoscaling
actor pool (``map_renderers``, as PairStream runs them today) -- and ``elastic_pool`` -- the same
``Renderer`` on ``caig_ray.dataplane.elastic.ElasticRenderers``, whose size the driver sets from the
backlog it knows (``map_renderers_elastic``; docs/benchmarks.md). The trace also has the
autoscaler's own view (``ray.autoscaler.v2.sdk.get_cluster_status``): the bundles a
``request_resources`` constraint holds, and the renderer nodes it counts idle. Writes
bench/results/autoscaling.json (Ray version, settings, both runs' trace and lags).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import ray
from ray.cluster_utils import AutoscalingCluster

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from ray_cleanup import own_ray_processes, stop_own_ray  # noqa: E402 -- stop only the Ray this bench started

from caig_ray.dataplane.stream import FeedDatasource, PairFeed, map_renderers  # noqa: E402
from caig_ray.config import ActorPoolConfig, CaigConfig, load_config  # noqa: E402
from caig_ray.rows import CandidatePair  # noqa: E402

RAY_BIN = str(Path(sys.executable).parent / "ray")
from caig_ray.dataplane.elastic import RENDERER_ACTOR  # noqa: E402

# renderer actors in Ray's actor table: Ray Data's pool (map_renderers) or the elastic pool
RENDERER_CLASSES = ("MapBatches(Renderer)", RENDERER_ACTOR)

# ray/autoscaler/_private/fake_multi_node/example.yaml of Ray's repository, which AutoscalingCluster
# reads and the fake provider loads as its defaults: the 2.60 wheel does not ship it (both raise
# FileNotFoundError), so the same settings are here
FAKE_CLUSTER_BASE = {
    "cluster_name": "fake_multinode", "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
    "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LocalAutoscalingCluster(AutoscalingCluster):
    """``AutoscalingCluster`` (its node-type config, its fake provider and autoscaler environment)
    that leaves every other Ray on the host alone.

    Ray's ``start()`` and ``shutdown()`` run ``ray stop --force``, which ends every Ray cluster on
    the host; here the head gets its own temp dir and GCS port (the fake provider's nodes join that
    port instead of 6379) and ``shutdown()`` stops only the processes under that temp dir. The fake
    provider is named by module path (provider type ``external``): under its own type name the
    autoscaler loads its defaults from the example.yaml the wheel lacks."""

    def __init__(self, head_resources: dict, worker_node_types: dict, autoscaler_v2: bool = True,
                 **config_kwargs):
        super().__init__(head_resources, worker_node_types, autoscaler_v2=autoscaler_v2, **config_kwargs)
        self.temp_dir: str | None = None
        self.address: str | None = None

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

        config = copy.deepcopy(FAKE_CLUSTER_BASE)
        config["provider"].update(type="external",
                                  module="ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider")
        config["available_node_types"] = copy.deepcopy(worker_node_types)
        config["available_node_types"]["ray.head.default"] = {"resources": dict(head_resources), "node_config": {},
                                                              "max_workers": 0}
        if autoscaler_v2:  # what AutoscalingCluster sets for v2
            config["provider"].update(launch_multiple=True, head_node_id=FAKE_HEAD_NODE_ID)
        config.update(config_kwargs)
        return config

    def start(self, _system_config=None, override_env: dict | None = None) -> str:
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

        # short: Ray's socket paths under it have a length limit
        self.temp_dir = tempfile.mkdtemp(prefix="caig-as-", dir="/tmp")
        port = _free_port()
        self.address = f"{ray._private.services.get_node_ip_address()}:{port}"
        self._config["provider"]["gcs_address"] = self.address
        config_file = Path(self.temp_dir) / "autoscaling.json"
        config_file.write_text(json.dumps(self._config))
        head = dict(self._head_resources)
        cmd = [RAY_BIN, "start", "--head", f"--autoscaling-config={config_file}", "--temp-dir", self.temp_dir,
               "--port", str(port), "--include-dashboard", "false", "--disable-usage-stats",
               f"--num-cpus={head.pop('CPU', 0)}", f"--num-gpus={head.pop('GPU', 0)}"]
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        if _system_config is not None:
            cmd.append(f"--system-config={json.dumps(_system_config, separators=(',', ':'))}")
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
        env.pop("RAY_ADDRESS", None)  # never join whatever cluster the environment points at
        if self._autoscaler_v2:
            env.update(RAY_enable_autoscaler_v2="1", RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
                       RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID)
        env.update(override_env or {})
        try:
            subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=180)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            self.shutdown()
            raise RuntimeError(f"ray start --head failed: {getattr(e, 'stderr', '') or e}") from e
        return self.address

    def shutdown(self) -> None:
        if self.temp_dir is None:
            return
        stop_own_ray(self.temp_dir)  # the head, the autoscaler, every node it launched, their workers
        keep = os.environ.get("CAIG_KEEP_RAY_LOGS")  # a folder to copy the cluster's logs to (debugging)
        if keep:
            shutil.copytree(Path(self.temp_dir) / "session_latest" / "logs", Path(keep) / Path(self.temp_dir).name,
                            dirs_exist_ok=True, ignore_dangling_symlinks=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir = None

    def leftover_processes(self) -> list:
        return own_ray_processes(self.temp_dir) if self.temp_dir else []


def renderer_node_type(max_nodes: int) -> dict:
    """cluster/raycluster.yaml's renderer group: one GPU and the ``renderer`` resource per node,
    from zero nodes."""
    return {"renderer": {"resources": {"CPU": 1, "GPU": 1, "renderer": 1}, "node_config": {},
                         "min_workers": 0, "max_workers": max_nodes}}


@contextmanager
def renderer_cluster(max_nodes: int, idle_timeout_s: float, head_cpus: int = 2):
    """A started autoscaling cluster with this driver connected to it (only to it); always torn down."""
    cluster = LocalAutoscalingCluster(head_resources={"CPU": head_cpus}, worker_node_types=renderer_node_type(max_nodes),
                                      autoscaler_v2=True, idle_timeout_minutes=idle_timeout_s / 60,
                                      max_workers=max_nodes)
    try:
        address = cluster.start()
        if ray.is_initialized():  # a connection this process still holds (a main that left Ray up) is not ours
            ray.shutdown()
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def bench_config(latency_s: float, max_size: int) -> tuple[CaigConfig, ActorPoolConfig]:
    """The quick preset's procedural renderer with a simulated render latency, and a renderer pool
    asking what the gpu-cluster preset's renderers ask for (a GPU and the ``renderer`` resource)."""
    cfg = load_config("quick", overrides={"renderer": {"simulated_latency_s": latency_s}})
    pool = ActorPoolConfig(min_size=1, max_size=max_size, num_cpus=0.5, num_gpus=1, resources={"renderer": 1})
    return cfg, pool


class ClusterTrace:
    """Every ``every`` s in a thread: renderer nodes alive, renderer actors alive and pending, rows
    done, and the autoscaler's view: bundles held by a resource-request constraint, renderer nodes idle."""

    def __init__(self, address: str, every: float = 0.5):
        self.address = address
        self.t0 = time.perf_counter()
        self.rows_done = 0
        self.samples: list[dict] = []
        self.sample_errors = self.status_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def sample(self) -> dict:
        from ray._private import state

        from ray.autoscaler.v2.sdk import get_cluster_status

        renderer_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("renderer", 0) > 0}
        actors = [a for a in state.actors().values() if any(c in a["ActorClassName"] for c in RENDERER_CLASSES)]
        sample = {"t": round(self.now(), 2), "renderer_nodes": len(renderer_nodes),
                  "actors_alive": sum(a["State"] == "ALIVE" for a in actors),
                  "actors_pending": sum(a["State"] in ("PENDING_CREATION", "DEPENDENCIES_UNREADY") for a in actors),
                  "rows_done": self.rows_done}
        try:
            status = get_cluster_status(self.address, timeout=5)
            sample["constraint_bundles"] = sum(b.count for d in status.resource_demands.cluster_constraint_demand
                                               for b in d.bundles_by_count)
            sample["renderer_nodes_idle"] = sum(n.node_id in renderer_nodes for n in status.idle_nodes)
        except Exception:  # noqa: BLE001 -- the autoscaler's state is extra; the counts above stand
            self.status_errors += 1
        return sample

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.sample())
            except Exception:  # noqa: BLE001 -- a GCS read failing while the cluster changes; counted
                self.sample_errors += 1
            self._stop.wait(every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def first(self, after: float, cond) -> float | None:
        """Seconds after ``after`` of the first sample at or after it that satisfies ``cond``."""
        return next((round(s["t"] - after, 2) for s in self.samples if s["t"] >= after and cond(s)), None)


def _rows(block: int, rows_per_block: int, image_ref: str) -> list[CandidatePair]:
    """The block's candidate pairs (two ads each, the online loop's rows); pair ids 0, 1, ... in feed order."""
    rows = []
    for i in range(block * rows_per_block, (block + 1) * rows_per_block):
        rows.append(CandidatePair(pair_id=str(i), kind="train", round=0, product_id="p0", title="pink lipstick",
                                  category="cosmetics", instruction="", desc_a="a bright stadium at dusk",
                                  desc_b="a bright stadium at dusk", seed=i, policy_version=0, image_ref=image_ref))
    return rows


def run_backlog(cfg: CaigConfig, pool: ActorPoolConfig, *, backlog_blocks: int, rows_per_block: int = 1,
                idle_s: float = 30.0, release_timeout_s: float = 60.0, elastic: bool = False,
                idle_release_s: float = 5.0, warmup: bool = True,
                sample_every_s: float = 0.5, log=print) -> dict:
    """Warm-up block, backlog, idle, end (the module docstring) on the connected cluster; returns the
    trace, what every output batch held, and the lags. Without ``warmup`` the backlog comes first, on
    a cluster with no renderer node yet. With ``elastic``, the pipeline
    renders on ``ElasticRenderers`` (sized by the backlog) instead of Ray Data's actor pool."""
    from caig_ray.market import make_catalog

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # as PairStream runs it
    ctx.enable_progress_bars = False
    image = Path(tempfile.mkdtemp(prefix="caig-autoscaling-")) / "product.png"  # read by every renderer node (one host)
    make_catalog(["cosmetics"], 1, cfg.market.product_image_size, seed=0)[0].image.save(image)
    n_blocks = int(warmup) + backlog_blocks + 1  # warm-up, backlog, the closing block
    trace = ClusterTrace(ray.get_runtime_context().gcs_address, sample_every_s)
    feed = PairFeed.remote()
    # the elastic variant keeps the read tasks (they wait on the feed) off the renderer nodes; the
    # Ray Data variant reads as PairStream does today
    where = {}
    if elastic:
        from caig_ray.dataplane.elastic import on_driver_node

        where = on_driver_node()
    ds = ray.data.read_datasource(FeedDatasource(feed, n_blocks), override_num_blocks=n_blocks,
                                  concurrency=max(2, pool.max_size), num_cpus=0, **where)
    # batch_size = a block's rows: a batch is a block, as PairStream's None means on CPU; Ray Data refuses
    # None for a stage that asks for GPUs (ray/data/dataset.py, map_batches)
    helper = None
    if elastic:
        from caig_ray.dataplane.elastic import ElasticRenderers, map_renderers_elastic

        helper = ElasticRenderers(cfg.renderer, pool, idle_release_s=idle_release_s)
        ds = map_renderers_elastic(ds, helper, rows_per_block)
    else:
        ds = map_renderers(ds, cfg.renderer, pool, rows_per_block)
    it = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
    batches: list[dict] = []  # per output batch: when the driver had it, which renderer process, its row ids
    fed = consumed = 0

    def put(k: int) -> None:
        nonlocal fed
        for _ in range(k):
            ray.get(feed.put.remote(fed, _rows(fed, rows_per_block, str(image))))
            fed += 1
        if helper:
            helper.set_backlog(fed - consumed)

    def take() -> None:
        nonlocal consumed
        table = next(it)
        pids = table.column("renderer_pid").to_pylist()
        batches.append({"t": round(trace.now(), 2), "pid": pids[0],
                        "ids": [int(i) for i in table.column("pair_id").to_pylist()]})
        trace.rows_done += table.num_rows
        feed.drop.remote(consumed)
        consumed += 1
        if helper:
            helper.set_backlog(fed - consumed)

    def wait_until(cond, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if cond(trace.sample()):
                    return
            except Exception:  # noqa: BLE001 -- a GCS read failing while nodes go; try again
                pass
            time.sleep(sample_every_s)

    try:
        t_warm = None
        if warmup:
            put(1)
            take()
            t_warm = trace.now()
            log(f"  warm-up block out at {t_warm:.1f} s (first node and actor from zero)")
        t_backlog = trace.now()
        put(backlog_blocks)
        for _ in range(backlog_blocks):
            take()
        t_drained = trace.now()
        log(f"  backlog of {backlog_blocks} blocks rendered in {t_drained - t_backlog:.1f} s")
        wait_until(lambda s: s["actors_alive"] <= pool.min_size and s["renderer_nodes"] <= pool.min_size, idle_s)
        t_idle_end = trace.now()
        put(1)
        take()
        try:
            next(it)
            raise RuntimeError("the dataset gave a block more than was fed")
        except StopIteration:
            pass
        if helper:  # the pipeline is over: its pool goes, as Ray Data's does when its dataset ends
            helper.close()
            helper = None
        t_end = trace.now()
        wait_until(lambda s: s["renderer_nodes"] == 0 and s["actors_alive"] == 0, release_timeout_s)
        time.sleep(sample_every_s * 2)  # a last sample or two after the release
    finally:
        trace.stop()
        if helper:
            helper.close()
        ray.kill(feed)
    return summarize(trace, batches, pool, t_warm=t_warm, t_backlog=t_backlog, t_drained=t_drained,
                     t_idle_end=t_idle_end, t_end=t_end, n_rows=n_blocks * rows_per_block)


def _held_seconds(samples: list[dict], start: float, end: float) -> float:
    """Seconds in [start, end] with more renderer nodes up than renderer actors alive while a
    ``request_resources`` constraint was held (nodes the pool no longer uses, kept)."""
    held = 0.0
    for a, b in zip(samples, samples[1:]):
        if start <= a["t"] < end and a["renderer_nodes"] > a["actors_alive"] and a.get("constraint_bundles", 0) > 0:
            held += b["t"] - a["t"]
    return round(held, 1)


def summarize(trace: ClusterTrace, batches: list[dict], pool: ActorPoolConfig, *, t_warm, t_backlog, t_drained,
              t_idle_end, t_end, n_rows) -> dict:
    samples = trace.samples
    peak_nodes = max(s["renderer_nodes"] for s in samples)
    peak_actors = max(s["actors_alive"] for s in samples)
    serving_pids: list[int] = []  # renderer processes in the order they first served a backlog block
    serving_lag: list[float] = []
    for b in batches:
        if t_backlog <= b["t"] <= t_drained and b["pid"] not in serving_pids:
            serving_pids.append(b["pid"])
            serving_lag.append(round(b["t"] - t_backlog, 2))
    ids = [i for b in batches for i in b["ids"]]
    rows_per_pid = {}
    for b in batches:
        rows_per_pid[b["pid"]] = rows_per_pid.get(b["pid"], 0) + len(b["ids"])
    return {
        "warmup_first_actor_serving_s": None if t_warm is None else round(t_warm, 2),
        "backlog_at_s": round(t_backlog, 2), "backlog_drained_s": round(t_drained - t_backlog, 2),
        "renderer_nodes_peak": peak_nodes, "pool_actors_peak": peak_actors,
        "renderer_nodes_before_backlog": next((s["renderer_nodes"] for s in reversed(samples) if s["t"] <= t_backlog), 0),
        # lag from the backlog's arrival to the k-th ..., k = 1..peak (list index k-1)
        "lag_to_kth_node_alive_s": [trace.first(t_backlog, lambda s, k=k: s["renderer_nodes"] >= k)
                                    for k in range(1, peak_nodes + 1)],
        "lag_to_kth_actor_alive_s": [trace.first(t_backlog, lambda s, k=k: s["actors_alive"] >= k)
                                     for k in range(1, peak_actors + 1)],
        "lag_to_kth_actor_serving_s": serving_lag,
        "actors_serving_backlog": len(serving_pids),
        # idle: from the backlog's last block out
        "lag_to_pool_at_min_size_s": trace.first(t_drained, lambda s: s["actors_alive"] <= pool.min_size),
        "lag_to_nodes_released_to_min_s": trace.first(t_drained, lambda s: s["renderer_nodes"] <= pool.min_size),
        "idle_waited_s": round(t_idle_end - t_drained, 2),
        # end: from the dataset's end
        "lag_to_all_nodes_released_s": trace.first(t_end, lambda s: s["renderer_nodes"] == 0),
        "rows_fed": n_rows, "rows_out": len(ids), "rows_distinct": len(set(ids)),
        "rows_exactly_once": sorted(ids) == list(range(n_rows)),
        "rows_per_renderer_process": list(rows_per_pid.values()),
        "trace_sample_errors": trace.sample_errors, "autoscaler_status_errors": trace.status_errors,
        "constraint_bundles_peak": max((s.get("constraint_bundles", 0) for s in samples), default=0),
        # the idle phase: renderer nodes the autoscaler counted idle while a resource request held them
        "idle_nodes_held_by_constraint_s": _held_seconds(samples, t_drained, t_idle_end),
        "phases_s": {"warmup_out": None if t_warm is None else round(t_warm, 2), "backlog_in": round(t_backlog, 2),
                     "backlog_out": round(t_drained, 2), "idle_end": round(t_idle_end, 2), "end": round(t_end, 2)},
        "trace": samples,
        "batches": [{"t": b["t"], "pid": b["pid"], "rows": len(b["ids"])} for b in batches],
    }


def run_variant(name: str, args, log=print) -> dict:
    cfg, pool = bench_config(args.latency, args.max_nodes)
    log(f"{name}: starting a cluster (head {args.head_cpus} CPUs; renderer nodes 0..{args.max_nodes})")
    t = time.perf_counter()
    with renderer_cluster(args.max_nodes, args.idle_timeout, args.head_cpus) as cluster:
        log(f"  cluster up in {time.perf_counter() - t:.0f} s")
        r = run_backlog(cfg, pool, backlog_blocks=args.backlog_blocks, rows_per_block=args.rows_per_block,
                        idle_s=args.idle, elastic=name == "elastic_pool", idle_release_s=args.idle_release, log=log)
        del cluster
    r["name"] = name
    log(f"  peak {r['renderer_nodes_peak']} renderer nodes, {r['pool_actors_peak']} actors; "
        f"lag to k-th actor serving {r['lag_to_kth_actor_serving_s']} s; "
        f"pool at min size {r['lag_to_pool_at_min_size_s']} s and nodes released to min "
        f"{r['lag_to_nodes_released_to_min_s']} s after the backlog; all released {r['lag_to_all_nodes_released_s']} s "
        f"after the end; rows exactly once: {r['rows_exactly_once']}")
    return r


MEDIAN_KEYS = ("warmup_first_actor_serving_s", "backlog_drained_s", "renderer_nodes_peak", "pool_actors_peak",
               "actors_serving_backlog", "lag_to_pool_at_min_size_s", "lag_to_nodes_released_to_min_s",
               "lag_to_all_nodes_released_s", "idle_nodes_held_by_constraint_s", "constraint_bundles_peak")


def _median(values: list) -> float | None:
    """The median of the runs that reached it; None when none did."""
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def summary(runs: list[dict], max_nodes: int) -> dict:
    """Medians over one variant's repeats; the k-th lags list None where no repeat reached k."""
    out = {k: _median([r[k] for r in runs]) for k in MEDIAN_KEYS}
    for key in ("lag_to_kth_node_alive_s", "lag_to_kth_actor_alive_s", "lag_to_kth_actor_serving_s"):
        out[key] = [_median([r[key][k] if k < len(r[key]) else None for r in runs]) for k in range(max_nodes)]
        out[key.replace("lag_to_kth", "repeats_reaching_kth")] = [sum(k < len(r[key]) for r in runs)
                                                                  for k in range(max_nodes)]
    out["rows_exactly_once"] = all(r["rows_exactly_once"] for r in runs)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backlog-blocks", type=int, default=24)
    p.add_argument("--rows-per-block", type=int, default=1, help="candidate pairs a block (two ads each)")
    p.add_argument("--latency", type=float, default=0.5, help="renderer.simulated_latency_s: seconds per image")
    p.add_argument("--max-nodes", type=int, default=3, help="renderer nodes at most (= the pool's max_size)")
    p.add_argument("--idle-timeout", type=float, default=6.0, help="the autoscaler's idle timeout, seconds")
    p.add_argument("--idle", type=float, default=45.0, help="seconds the pipeline waits idle at most")
    p.add_argument("--head-cpus", type=int, default=2)
    p.add_argument("--idle-release", type=float, default=5.0,
                   help="the elastic pool stops a surplus renderer after this many seconds too big")
    p.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved")
    p.add_argument("--variants", default="ray_data_pool,elastic_pool")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "autoscaling.json"))
    args = p.parse_args()
    command = " ".join(["python bench/autoscaling.py", *sys.argv[1:]])
    print(command, flush=True)
    started = time.perf_counter()
    variants = args.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(args.repeats):  # interleaved: the host's load (another benchmark) hits both alike
        for v in variants:
            r = run_variant(v, args, log=lambda m: print(m, flush=True))
            r.pop("name")
            runs[v].append(r)
    medians = {v: summary(rs, args.max_nodes) for v, rs in runs.items()}
    result = {"command": command, "ray": ray.__version__, "ray_commit": ray.__commit__,
              "autoscaler": "v2 (fake multi-node provider)", "host_cpus": os.cpu_count(),
              "settings": {k: getattr(args, k) for k in ("backlog_blocks", "rows_per_block", "latency", "max_nodes",
                                                         "idle_timeout", "idle", "idle_release", "head_cpus",
                                                         "repeats")},
              "renderer_node_type": renderer_node_type(args.max_nodes)["renderer"]["resources"],
              "pool": bench_config(args.latency, args.max_nodes)[1].model_dump(mode="json"),
              "median": medians, "runs": runs, "bench_s": round(time.perf_counter() - started, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for v, m in medians.items():
        print(f"{v:14s} median of {args.repeats}: lag to k-th actor serving {m['lag_to_kth_actor_serving_s']} s "
              f"(k-th node alive {m['lag_to_kth_node_alive_s']} s); nodes released to min "
              f"{m['lag_to_nodes_released_to_min_s']} s after the backlog, all {m['lag_to_all_nodes_released_s']} s "
              f"after the end; rows exactly once: {m['rows_exactly_once']}")
    print(f"wrote {args.out} ({result['bench_s']:.0f} s)")


if __name__ == "__main__":
    main()
