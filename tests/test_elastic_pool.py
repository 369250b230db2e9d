"""The backlog-sized renderer pool (``resources.renderers.sizing: backlog``, dataplane/elastic.py) on a
local Ray: a renderer that cannot start (here: a diffusers renderer pointed at a folder with no
model) ends the pool with the reason, as Ray Data's pool ends its stage, instead of being started
again and again while the stage's tasks wait for it. (Growth and release on an autoscaling
cluster: tests/test_autoscaling.py; the online loop on it: tests/test_online_loop.py.)"""

import pytest


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_renderer_that_cannot_start_fails_the_pool_with_its_reason(tmp_path):
    import ray

    from caig_ray.config import ActorPoolConfig, RendererConfig
    from caig_ray.dataplane.elastic import ElasticRenderers

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    renderer = RendererConfig(kind="diffusers", sd_path=str(empty), controlnet_path=str(empty), image_size=64)
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        pool = ElasticRenderers(renderer, ActorPoolConfig(min_size=1, max_size=2, num_cpus=0.5))
        pool.set_backlog(2)
        with pytest.raises(ray.exceptions.RayTaskError, match="a renderer actor failed to start"):
            ray.get(pool.controller.acquire.remote(), timeout=150)
        stats = pool.stats()
        assert "failed to start" in stats["failed"] and stats["ready"] == 0
        assert stats["started"] <= 2, stats  # the backlog's two, never started again
        pool.close()
    finally:
        ray.shutdown()
