"""PolicyGroup: 2 CPU workers (gloo) under ZeRO-1/2/3 -- DPO+PCPO steps, generation, save/load."""

import pytest
import ray

from caig_ray.config import load_config
from caig_ray.data import read_catalog
from caig_ray.imaging import png_bytes
from caig_ray.prompts import pm_instruction
from caig_ray.rows import PreferenceExample, ProductPrompt


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def products(quick_world):
    return [ProductPrompt(title=p.title, attributes=p.attributes, image=png_bytes(p.image))
            for p in read_catalog(quick_world.catalog)[:4]]


def _examples(products):
    return [PreferenceExample(pair_id=str(i), image=p.image, instruction=pm_instruction(p.title, p.attributes),
                              chosen="a bright stadium background with vivid tones", rejected="dim kitchen, busy",
                              seed=i) for i, p in enumerate(products)]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_policy_group_trains_saves_and_loads(local_ray, quick_world, products, tmp_path, stage):
    from caig_ray.actors.policy import PolicyGroup

    full = load_config("quick", overrides={"policy": {"zero_stage": stage, "lr": 5e-3},
                                           "resources": {"policy": {"num_workers": 2, "num_cpus": 1}}})
    cfg, placement = full.policy, full.resources.policy
    group = PolicyGroup(quick_world.policy, cfg, placement)
    try:
        batch = _examples(products)
        losses = []  # a step's loss is taken before its update: the 4th sees 3 steps of training
        for _ in range(4):
            m = group.train_step(batch)
            assert m["n_examples"] == 4 and "pcpo/loss" in m and "rewards/accuracies" in m
            losses.append(m["loss"])
        assert losses[-1] < losses[0]
        gen = group.generate(products[:3], n=2, temperature=1.0, seed=7)
        assert len(gen) == 3 and all(len(g["descriptions"]) == 2 for g in gen)
        assert gen == group.generate(products[:3], n=2, temperature=1.0, seed=7)
        lp = group.logps(batch)
        group.save(tmp_path / "ckpt")
    finally:
        group.shutdown()
    assert (tmp_path / "ckpt" / "hf" / "config.json").is_file()
    fresh = PolicyGroup(quick_world.policy, cfg, placement)
    try:
        assert fresh.logps(batch) != pytest.approx(lp, abs=1e-6)  # a fresh group starts from PM0
        fresh.load(tmp_path / "ckpt")
        assert fresh.logps(batch) == pytest.approx(lp, abs=1e-5)
    finally:
        fresh.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_policy_group_lora_trains_adapters_only(local_ray, quick_world, products, tmp_path):
    from caig_ray.actors.policy import PolicyGroup

    full = load_config("quick", overrides={"policy": {"zero_stage": 2, "lr": 1e-2,
                                                      "lora": {"enabled": True, "r": 8, "alpha": 16}},
                                           "resources": {"policy": {"num_workers": 2, "num_cpus": 1}}})
    cfg, placement = full.policy, full.resources.policy
    group = PolicyGroup(quick_world.policy, cfg, placement)
    try:
        batch = _examples(products)
        losses = [group.train_step(batch)["loss"] for _ in range(4)]
        assert losses[-1] < losses[0]
        group.save(tmp_path / "ckpt")
    finally:
        group.shutdown()
    assert (tmp_path / "ckpt" / "adapter" / "adapter_config.json").is_file()
    # what was trained is what the adapter holds: LoRA weights only, none of the tower or the head
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        trained = list(f.keys())
    assert trained and all("lora_" in n for n in trained)
    assert not any("visual" in n or "lm_head" in n for n in trained)
