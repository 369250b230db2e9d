"""``PoolCensus`` (actors/census.py): the pool trace's head count of our pool actors, reported by the
actors themselves through public Ray calls (no private API, no dashboard)."""

import time

import pytest
import ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class _PoolActor:
    def __init__(self, census):
        from caig_ray.actors.census import report_alive

        report_alive(census, "renderer", every_s=0.1)

    def ping(self) -> bool:
        return True


def _wait_for(census, n: int, timeout_s: float = 20) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sizes = ray.get(census.sizes.remote())
        if sizes.get("renderer", 0) == n:
            return sizes
        time.sleep(0.1)
    raise AssertionError(f"census never counted {n} renderers: {sizes}")


def test_the_census_counts_the_actors_up_and_drops_the_ones_gone(local_ray):
    from caig_ray.actors.census import PoolCensus

    census = PoolCensus.remote(stale_s=0.5)
    actors = [_PoolActor.remote(census) for _ in range(3)]
    assert ray.get([a.ping.remote() for a in actors]) == [True] * 3
    assert _wait_for(census, 3) == {"renderer": 3}
    ray.kill(actors.pop())  # killed (a crash, a forced release): it stops reporting
    _wait_for(census, 2)
    gone = actors.pop()
    pid_probe = gone.ping.remote()
    assert ray.get(pid_probe)
    del gone, pid_probe  # released the way Ray Data's pool releases an idle actor: its last handle dropped
    _wait_for(census, 1)  # so the census holds no handle that would keep a released actor alive
    assert ray.get(actors[0].ping.remote())

