"""The renderer pool on an autoscaling cluster, the way KubeRay runs it (issue 23): a local cluster
whose renderer nodes ({CPU: 1, GPU: 1, renderer: 1}, 0..3; the GPU a logical one) only the autoscaler
(v2, Ray's fake multi-node provider) adds; the project's ``Renderer`` on the elastic pool
(``caig_ray.dataplane.elastic``), sized by the backlog the driver feeds. Same code path as
bench/autoscaling.py (``run_backlog``); only this test's cluster is ever stopped."""

import importlib.util
from pathlib import Path

import pytest
from ray_cleanup import own_ray_processes


def _bench():
    spec = importlib.util.spec_from_file_location("bench_autoscaling",
                                                  Path(__file__).resolve().parents[1] / "bench" / "autoscaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_backlog_grows_the_renderer_pool_through_nodes_the_autoscaler_adds_and_idle_releases_them():
    bench = _bench()
    # the backlog arrives on a cluster with no renderer node. 2 s a image, 2 images a block (one pair): one
    # renderer takes 48 s for its 12 blocks, so the pool's growth (a node, then a renderer loading:
    # ~20 s on a loaded 2-core machine) is what drains it, however slow the host
    cfg, pool = bench.bench_config(latency_s=2.0, max_size=3)
    with bench.renderer_cluster(max_nodes=3, idle_timeout_s=4) as cluster:
        temp_dir = cluster.temp_dir
        r = bench.run_backlog(cfg, pool, backlog_blocks=12, rows_per_block=1, idle_s=45, release_timeout_s=45,
                              elastic=True, idle_release_s=3, warmup=False)
    assert not own_ray_processes(temp_dir), "the cluster's processes outlived its shutdown"

    trace = r["trace"]
    # the renderer group starts from zero (the head has no renderer resource): every node is the autoscaler's
    assert trace[0]["renderer_nodes"] == 0 and r["renderer_nodes_before_backlog"] == 0
    # the backlog: the autoscaler added nodes and the pool grew onto them, and more than one renderer served it
    assert r["renderer_nodes_peak"] >= 2 and r["pool_actors_peak"] >= 2, r["lag_to_kth_node_alive_s"]
    assert r["actors_serving_backlog"] >= 2, r["batches"]
    assert len(r["rows_per_renderer_process"]) >= 2
    # every row out exactly once, whichever renderer had it
    assert r["rows_exactly_once"] and r["rows_out"] == r["rows_fed"] == 13
    # idle: the pool shrank to min_size and the autoscaler released the nodes it no longer held an actor on
    assert r["lag_to_pool_at_min_size_s"] is not None
    assert r["lag_to_nodes_released_to_min_s"] is not None, [(s["t"], s["renderer_nodes"]) for s in trace]
    # end: the pool is gone, and so is every renderer node
    assert r["lag_to_all_nodes_released_s"] is not None and trace[-1]["renderer_nodes"] == 0
    assert r["constraint_bundles_peak"] == 0  # nothing asked request_resources: pending actors drove the nodes
