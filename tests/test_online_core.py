"""The online loop's pure parts: product plans, candidate pairs, the market verdict, the lift CI, faults."""

import json

import numpy as np
import pytest

from caig_ray.config import ConfigError, MarketConfig, load_config
from caig_ray.data.catalog import Product
from caig_ray.faults import should_fire
from caig_ray.online import (
    MarketOracle, candidate_pairs, match_rate, paired_lift, render_seed, round_products, split_eval_products,
)


def test_eval_products_are_held_out_and_rounds_are_reproducible():
    ids = [f"p{i:03d}" for i in range(50)]
    train, held = split_eval_products(ids, 10, seed=3)
    assert len(held) == 10 and not set(train) & set(held) and sorted(train + held) == ids
    assert split_eval_products(ids, 10, seed=3) == (train, held)
    r0, r1 = round_products(train, 0, 16, seed=3), round_products(train, 1, 16, seed=3)
    assert len(set(r0)) == 16 and set(r0) <= set(train)
    assert r0 == round_products(train, 0, 16, seed=3)  # a resumed job gets the same products
    assert r0 != r1
    assert sorted(round_products(train, 2, 999, seed=3)) == sorted(train)
    with pytest.raises(ValueError, match="eval_products=50"):
        split_eval_products(ids, 50, seed=0)


def test_candidate_pairs_share_a_seed_and_have_unique_ids():
    from PIL import Image

    img = Image.new("RGBA", (8, 8))
    prods = [Product(id=f"p{i}", title=f"red shoe {i}", image=img, category="sneakers") for i in range(3)]
    gens = [{"descriptions": ["a \"bright\" stadium.", "soft vanity"], "duplicate": [False, False]}] * 3
    pairs = candidate_pairs(prods, gens, round_index=4, seed=0, policy_version=7)
    assert [p.pair_id for p in pairs] == ["train-r004-p0", "train-r004-p1", "train-r004-p2"]
    assert pairs[0].desc_a == "a bright stadium"  # cleaned as CAIG cleans prompts before rendering
    assert pairs[0].seed == render_seed(0, "p0", 4) and pairs[0].seed != pairs[1].seed
    assert all(p.policy_version == 7 and p.round == 4 for p in pairs)
    with pytest.raises(ValueError, match="3 products but 2"):
        candidate_pairs(prods, gens[:2], 0, 0, 0)


def test_market_verdict_and_match_rate():
    oracle = MarketOracle(MarketConfig())
    lat = {"scene": "stadium", "palette": "vivid", "lighting": "bright", "clutter": "minimal", "contrast": 0.3}
    shoe = oracle.verdict("sneakers", json.dumps(lat), "stadium", 1)
    lipstick = oracle.verdict("cosmetics", lat, "stadium", 1)
    assert shoe["match"] and not lipstick["match"] and shoe["true_ctr"] > lipstick["true_ctr"]
    plain = oracle.verdict("cosmetics", {**lat, "scene": "plain"}, "x", 1)
    assert match_rate([shoe, lipstick, plain]) == 0.5  # plain backgrounds set no scene: not counted
    assert match_rate([plain]) is None


def test_paired_lift_interval():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.02, 0.05, 400)
    out = paired_lift(base + 0.004 + rng.normal(0, 0.002, 400), base)
    assert out["ci95"][0] < 0.004 < out["ci95"][1] and out["ci95"][0] > 0 and out["n"] == 400
    null = paired_lift(base, base)
    assert null["diff"] == 0 and null["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError):
        paired_lift([0.1], [0.1])


def test_faults_fire_once_and_need_a_marker_dir(tmp_path):
    assert should_fire(str(tmp_path), "renderer") and not should_fire(str(tmp_path), "renderer")
    assert not should_fire(None, "renderer")
    with pytest.raises(ConfigError, match="marker_dir"):
        load_config("quick", overrides={"online": {"faults": {"renderer_die_after_batches": 2}}})
    with pytest.raises(ConfigError, match="resources.renderers"):
        load_config("quick", overrides={"resources": {"renderers": {"min_size": 3, "max_size": 1}}})


def test_train_refuses_bad_paths_a_changed_config_and_bad_rows_before_any_model_loads(quick_world, tmp_path, capsys):
    """Paths and config are checked before Ray starts; the catalog's rows by validation on Ray, before
    the policy group or a pool starts."""
    from caig_ray.jobs.train import main

    common = ["--preset", "quick", "--catalog", str(quick_world.catalog), "--rm", str(quick_world.reward)]
    assert main(["--out", str(tmp_path / "a"), "--policy", str(tmp_path / "nope"), *common]) == 2
    assert "--policy (the pretrained PM)" in capsys.readouterr().err
    run = tmp_path / "b"
    run.mkdir()
    from caig_ray.config import save_config

    from caig_ray.online import RunRecord

    save_config(load_config("quick", overrides={"policy": {"lr": 0.5}}), run / "config.yaml")
    (run / "run.json").write_text(RunRecord(run_id="r1", started_at="t", rounds=2).to_json())  # a stopped run
    assert main(["--out", str(run), "--policy", str(quick_world.policy), "--resume", *common]) == 2
    err = capsys.readouterr().err
    assert "policy.lr" in err and "--resume" in err
    bad = tmp_path / "catalog.json"
    bad.write_text('[{"id": "p1", "image": "missing.png", "new_caption": "a shoe"}]')
    assert main(["--preset", "quick", "--out", str(tmp_path / "c"), "--policy", str(quick_world.policy),
                 "--catalog", str(bad), "--rm", str(quick_world.reward)]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_instruction_templates_are_drawn_per_product_and_round_and_reproducible():
    """CAIG's variety: training products get one of k PM templates per (product, round), seeded; the
    instruction a pair trains on is the one its samples were generated with."""
    from caig_ray.online import candidate_pairs, pm_template
    from caig_ray.prompts import PM_TEMPLATES, RM_TEMPLATES, pm_instruction, template_index

    assert len(PM_TEMPLATES) == 10 and len(RM_TEMPLATES) == 12
    drawn = {pm_template(0, f"p{i}", r, 10) for i in range(40) for r in range(3)}
    assert len(drawn) >= 8  # most templates are used
    assert pm_template(0, "p1", 2, 10) == pm_template(0, "p1", 2, 10)  # a resumed job draws the same
    assert {pm_template(0, f"p{i}", 0, 1) for i in range(20)} == {0}  # k = 1: always the first
    assert len({template_index(0, f"{i}-{i + 1}", 12, 0) for i in range(60)}) >= 10

    class P:
        def __init__(self, i):
            self.id, self.title, self.attributes, self.category = f"p{i}", f"item {i}", {"color": "red"}, "shoes"

    prods = [P(i) for i in range(6)]
    gens = [{"descriptions": ["a", "b"], "token_ids": [[1], [2]]} for _ in prods]
    pairs = candidate_pairs(prods, gens, 1, 0, 0, n_templates=10)
    for p, c in zip(prods, pairs):
        assert c.instruction == pm_instruction(p.title, p.attributes, pm_template(0, p.id, 1, 10))
        assert c.ids_a == [1] and c.ids_b == [2]
