"""Every entrypoint on every real checkpoint family (issue 11), each family's chain once per suite;
tiny random models of the real architectures, hub layout. The expensive runs are shared: each chain's
jobs feed the assertions of what they write (issue 25: one run per family, several checks; the checks
themselves are tests/chain_checks.py).

- LLaVA-NeXT, here, as functions: pretrain-pm -> train-rm (from the pretrained PM's folder, as CAIG does;
  ZeRO-3 on 2 ranks, the checkpoint reloaded into the scorer gives the trained engine's P(left)) ->
  evaluate-rm -> train (one online round under ZeRO-3; the other two chains' rounds run ZeRO-2, the
  quick preset's stage) -> generate (the run's own policy, by the path the summary gives) -> serve.
- Qwen2.5-VL by the CLI mains with ``--storage`` (a shared POSIX folder), train-rm and generate by
  ``ray job submit`` on a real head (tests/test_job_submit.py).
- Qwen2-VL's chain is the object-store one (tests/test_storage.py: every model given as the URI an
  earlier job wrote). ZeRO-2 for train-rm runs in the demo and the CLI tests."""

import json
from pathlib import Path

import pytest
import ray

from caig_ray.config import load_config
from caig_ray.testing.hub_families import FUNCTION_CHAIN_FAMILY, tiny_chain_overrides
from chain_checks import (assert_evaluation, assert_online_round, assert_pretrained, assert_rm_reloads_into_the_scorer,
                          model_type, serve_answers, small_catalog)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _cfg(family_dir, **extra):
    over = tiny_chain_overrides(family_dir)
    for key, value in extra.items():
        over.setdefault(key, {}).update(value)
    return load_config("quick", overrides=over)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_every_entrypoint_on_a_real_family(local_ray, quick_world, hub_models, tmp_path):
    from caig_ray.jobs.evaluate_rm import evaluate_rm
    from caig_ray.jobs.generate import generate
    from caig_ray.jobs.pretrain_pm import pretrain_pm
    from caig_ray.jobs.train import train
    from caig_ray.jobs.train_rm import train_rm

    family = FUNCTION_CHAIN_FAMILY
    cfg = _cfg(hub_models[family])
    pm = tmp_path / "pm"
    assert_pretrained(pretrain_pm(cfg, quick_world.root, pm), pm, family, cfg.pretrain.eval_products)

    cfg = _cfg(hub_models[family], reward={"backbone_path": str(pm)})  # CAIG: the RM starts from PM0
    rm = tmp_path / "rm"
    s = train_rm(cfg, quick_world.root, rm)
    assert s["zero_stage"] == 3 and model_type(rm) == family
    # Ray Train's equal shards of the pairs: the same number of whole batches on each rank
    ranks = cfg.resources.reward_training.num_workers
    assert ranks == 2 and s["pairs_per_rank"] == cfg.train_rm.max_pairs // ranks
    assert s["step"] == s["pairs_per_rank"] // cfg.train_rm.batch_size >= 1
    assert_rm_reloads_into_the_scorer(s, rm, cfg, quick_world)

    ev = evaluate_rm(cfg, quick_world.root, rm, tmp_path / "rm_eval.json")
    assert json.loads((tmp_path / "rm_eval.json").read_text()) == ev
    assert_evaluation(ev)

    s = train(_cfg(hub_models[family], policy={"zero_stage": 3}), tmp_path / "online_z3", str(pm), str(rm),
              str(quick_world.catalog), progress=False)
    assert_online_round(s)

    g = generate(cfg, small_catalog(quick_world, tmp_path), tmp_path / "gen", s["policy_path"], str(rm),
                 n=2)  # the tuned policy, by path
    assert g["products"] == 2 and g["candidates"] == 4
    serve_answers(str(rm), f"rm-{family}")


def test_the_three_chains_cover_every_family():
    """Each family has its chain, and each chain's module runs the family it is named for."""
    from caig_ray.testing import hub_families as hf

    chains = {"test_families_entrypoints.py": "FUNCTION_CHAIN_FAMILY", "test_job_submit.py": "CLI_STORAGE_CHAIN_FAMILY",
              "test_storage.py": "OBJECT_STORE_CHAIN_FAMILY"}
    assert sorted(getattr(hf, name) for name in chains.values()) == sorted(hf.FAMILIES)
    for module, name in chains.items():
        assert f"family = {name}" in (Path(__file__).parent / module).read_text(), module
