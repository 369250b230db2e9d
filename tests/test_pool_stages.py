"""The model stages on GPU pools can be built: ``train``'s render/score stages and ``generate``'s
describe/render/score stages with the gpu-cluster preset's pools (a GPU per actor), each stage taking
one whole block per call.

Ray Data's public ``map_batches`` raises at build time ("You must provide `batch_size` ... when
requesting GPUs") for ``batch_size=None`` with GPUs; an online job or a ``generate`` run on GPU pools
used to stop there before any work. Building needs no GPU (nothing is scheduled), so this runs on CPU.
"""

import pytest

from caig_ray.config import load_config
from caig_ray.storage import Output


def _map_ops(ds) -> list:
    """The dataset's MapBatches operators, source first (its logical plan: Ray's own record of what
    each stage asks for)."""
    ops, op = [], ds._logical_plan.dag
    while op is not None:
        if type(op).__name__ == "MapBatches":
            ops.append(op)
        op = op.input_dependencies[0] if op.input_dependencies else None
    return ops[::-1]


class _Identity:
    def __call__(self, batch):
        return batch


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_train_and_generate_stages_build_on_gpu_pools(local_ray, tmp_path):
    from caig_ray.dataplane.stream import FeedDatasource, map_pool, render_and_score
    from caig_ray.jobs.generate import generate_stages

    ray = local_ray
    cfg = load_config("gpu-cluster")
    res = cfg.resources
    assert min(res.renderers.num_gpus, res.scorers.num_gpus, res.generators.num_gpus) > 0
    source = ray.data.read_datasource(FeedDatasource(None, 2), override_num_blocks=2, num_cpus=0)

    ops = _map_ops(render_and_score(source, cfg, "rm", Output(tmp_path / "ads")))
    assert [o._name for o in ops] == ["MapBatches(Renderer)", "MapBatches(RewardScorer)"]
    for op, pool in zip(ops, (res.renderers, res.scorers)):
        assert op.ray_remote_args["num_gpus"] == pool.num_gpus
        assert op.min_rows_per_bundled_input is None  # one whole block per call: nothing waits to bundle
        assert (op.compute.min_size, op.compute.max_size) == (pool.min_size, pool.max_size)

    ops = _map_ops(generate_stages(source, cfg, "policy", "rm", n=4, seed=0))
    assert [o._name for o in ops] == ["MapBatches(Describer)", "MapBatches(CandidateRenderer)",
                                         "MapBatches(CandidateRanker)"]
    for op, pool in zip(ops, (res.generators, res.renderers, res.scorers)):
        assert op.ray_remote_args["num_gpus"] == pool.num_gpus and op.min_rows_per_bundled_input is None

    # an int batch size goes through the public call (it bundles up to that many rows)
    op = _map_ops(map_pool(source, _Identity, res.scorers, batch_size=8))[0]
    assert op.min_rows_per_bundled_input == 8 and op.ray_remote_args["num_gpus"] == res.scorers.num_gpus
