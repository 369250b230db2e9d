"""Policy ranks on different Ray nodes (issue 13): a multi-node cluster on this machine
(``ray.cluster_utils.Cluster``: one raylet per node, each with its own temp dir), the two ranks placed
STRICT_SPREAD, DeepSpeed over gloo between them; every rank writes its ZeRO shard of the checkpoint, each
node uploads what it holds to the object store (a local S3 server), and a fresh group -- again one rank
per node, each node downloading the checkpoint -- resumes from there to the same policy."""

import pytest
import ray

from caig_ray.config import load_config
from caig_ray.data import read_catalog
from caig_ray.imaging import png_bytes
from caig_ray.rows import PreferenceExample
from caig_ray.prompts import pm_instruction


@pytest.fixture(scope="module")
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ranks_on_two_nodes_checkpoint_to_storage_and_resume(s3_store, two_node_cluster, quick_world, tmp_path):
    """Each node uploads its rank's shard to the object store; the local copy is deleted; a fresh group
    (each node downloading what it loads) resumes to the same policy."""
    import shutil

    from caig_ray.actors.policy import PolicyGroup
    from caig_ray.storage import resolve_output

    ckpt = resolve_output(s3_store, "multinode/round_000")
    storage = ckpt.local.parent  # the nodes' local copy (one host here: the same folder)
    full = load_config("quick", overrides={"policy": {"zero_stage": 3, "lr": 5e-3},
                                           "resources": {"policy": {"num_workers": 2, "num_cpus": 1,
                                                                    "placement_strategy": "STRICT_SPREAD"}}})
    products = [{"id": p.id, "title": p.title, "attributes": p.attributes, "image": png_bytes(p.image)}
                for p in read_catalog(quick_world.catalog)[:4]]
    batch = [PreferenceExample(pair_id=str(i), image=p["image"], instruction=pm_instruction(p["title"], p["attributes"]),
                               chosen="a bright stadium background with vivid tones", rejected="dim kitchen, busy",
                               seed=i) for i, p in enumerate(products)]
    group = PolicyGroup(quick_world.policy, full.policy, full.resources.policy)
    try:
        nodes = group.node_ids()
        assert len(set(nodes)) == 2  # one rank per node
        for _ in range(2):
            group.train_step(batch)
        trained = group.logps(batch)
        group.save(ckpt.local, ckpt.uri)
    finally:
        group.shutdown()
    ranks = sorted(n for n in ckpt.child("deepspeed").listdir())
    tags = ckpt.child(f"deepspeed/{[n for n in ranks if n != 'latest'][0]}").listdir()
    assert sum(n.endswith("model_states.pt") for n in tags) == 2, tags  # a shard from each node's rank, in the store
    shutil.rmtree(storage)  # fresh pods: nothing local
    fresh = PolicyGroup(quick_world.policy, full.policy, full.resources.policy)
    try:
        assert len(set(fresh.node_ids())) == 2
        assert fresh.logps(batch) != pytest.approx(trained, abs=1e-6)
        fresh.load(ckpt.local, ckpt.uri)
        assert fresh.logps(batch) == pytest.approx(trained, abs=1e-5)
    finally:
        fresh.shutdown()
