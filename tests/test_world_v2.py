"""World v2's pieces outside the market tables: perception pretraining, CAIG's native-size PCPO mask,
PCPO metrics per negative kind, the evaluation's market metrics over several samples, McNemar."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from caig_ray.losses import pcpo_kind_means, pcpo_kind_parts, preference_loss
from caig_ray.pcpo import pcpo_negative


def test_pcpo_mask_is_cut_at_the_native_size_before_the_resize():
    """CAIG zeroes 75% of the 32-px patches of the image as stored: a 128-px image is a 4 x 4 grid, so
    12 of 16 blocks are black and, resized to 64, the black area is 75% in 16-px-aligned blocks."""
    native = Image.new("RGB", (128, 128), (255, 255, 255))
    small = native.resize((64, 64))
    for seed in range(20):
        neg = pcpo_negative(0, [small, small], ["i0", "i1"], ["y0", "y1"], np.random.default_rng(seed),
                            native=[native, native], size=64)
        if neg["kind"] != "masked_image":
            continue
        arr = np.asarray(neg["image"])
        assert arr.shape == (64, 64, 3)
        blocks = arr.reshape(4, 16, 4, 16, 3).mean(axis=(1, 3, 4))
        # the resize's filter blurs a block edge by a pixel: each block is still all but black or white
        assert ((blocks < 12) | (blocks > 243)).all() and (blocks < 12).sum() == 12
        return
    pytest.fail("no masked-image negative in 20 draws")


def test_pcpo_metrics_per_kind_average_like_one_forward():
    """Parts computed per micro-batch and averaged by rows give the per-kind means of the whole batch."""
    g = torch.Generator().manual_seed(0)
    pcpo = tuple(torch.randn(6, generator=g) for _ in range(4))
    kinds = ["masked_image", "other_caption", "masked_image", "masked_image", "other_caption", "masked_image"]
    whole = pcpo_kind_means(pcpo_kind_parts(pcpo, kinds, 0.5))
    halves = [pcpo_kind_parts(tuple(t[s] for t in pcpo), kinds[s], 0.5) for s in (slice(0, 2), slice(2, 6))]
    mixed = pcpo_kind_means({k: 2 / 6 * halves[0][k] + 4 / 6 * halves[1][k] for k in halves[0]})
    for kind in ("masked_image", "other_caption"):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        _, direct = preference_loss(*(t[idx] for t in pcpo), beta=0.5)
        assert whole[f"pcpo/{kind}/loss"] == pytest.approx(direct["loss"], rel=1e-5)
        assert whole[f"pcpo/{kind}/accuracy"] == pytest.approx(direct["rewards/accuracies"])
        assert mixed[f"pcpo/{kind}/loss"] == pytest.approx(whole[f"pcpo/{kind}/loss"], rel=1e-5)
    assert not any(k.endswith("_part") for k in whole)


def test_eval_market_metrics_count_every_ad_and_pair_by_product():
    from caig_ray.online import eval_market_metrics
    from caig_ray.rows import CandidatePair

    rows = [CandidatePair(pair_id=f"e-{p}-{j}", kind="eval", round=0, product_id=p, title="t", category=c,
                          instruction="", desc_a="x", desc_b="y", seed=j, policy_version=0, sample=j)
            for j, (p, c) in enumerate((("a", "toys"), ("a", "toys"), ("b", "kitchen"), ("b", "kitchen")))]
    v = lambda ta, tb, ma, sa: {"true_ctr_a": ta, "true_ctr_b": tb, "match_a": ma, "has_scene_a": sa,  # noqa: E731
                                "match_b": True, "has_scene_b": True}
    verdicts = [v(0.05, 0.04, True, True), v(0.03, 0.04, False, True), v(0.02, 0.02, False, False), v(0.04, 0.02, False, True)]
    m = eval_market_metrics(rows, verdicts)
    assert m["mismatch_share"] == pytest.approx(2 / 4)  # a plain background is no mismatch
    assert m["mismatch_share_by_category"] == {"kitchen": 0.5, "toys": 0.5}
    assert m["base_mismatch_share"] == 0.0
    assert m["match_rate"] == pytest.approx(1 / 3)  # of the ads with a scene
    assert m["lift"]["n"] == 2  # products, not ads, are the units
    assert m["lift"]["diff"] == pytest.approx(np.mean([(0.05 + 0.03) / 2 - 0.04, (0.02 + 0.04) / 2 - 0.02]))
    assert m["n_ads"] == 4


def test_mcnemar_exact():
    from caig_ray.jobs.evaluate_rm import mcnemar

    a = np.array([True] * 10 + [False] * 2 + [True] * 5)
    b = np.array([False] * 10 + [True] * 2 + [True] * 5)
    res = mcnemar(a, b)
    assert (res["a_only"], res["b_only"]) == (10, 2)
    from math import comb

    assert res["p_two_sided"] == pytest.approx(2 * sum(comb(12, k) for k in range(3)) / 2**12)
    assert mcnemar(a, a)["p_two_sided"] == 1.0


def test_make_world_pretrains_the_tower_and_reports_the_probe(tmp_path):
    """The tower in the world's PM changes, the RM's start gets the same tower, and the probe's
    accuracies before and after are reported for every probed attribute."""
    from safetensors.torch import load_file

    from caig_ray.config import load_config
    from caig_ray.perception import PROBED
    from caig_ray.world import WorldLayout, make_world

    cfg = load_config("quick", overrides={"market": {"n_products": 10},
                                          "perception": {"train_renders": 32, "probe_renders": 40, "epochs": 1}})
    plain = make_world(cfg.model_copy(update={"perception": cfg.perception.model_copy(update={"train_renders": 0})}),
                       tmp_path / "plain", progress=False)
    summary = make_world(cfg, tmp_path / "w", progress=False)
    assert "perception" not in plain and set(summary["perception"]["probe_accuracy"]) == set(PROBED)
    lay, before = WorldLayout(tmp_path / "w"), WorldLayout(tmp_path / "plain")
    report = json.loads(lay.perception.read_text())
    assert report["steps"] == 1 and all(0 <= a <= 1 for a in report["probe_accuracy"].values())
    pm, pm0, rm = (load_file(str(d / "model.safetensors")) for d in (lay.policy, before.policy, lay.reward))
    tower = [k for k in pm if ".visual." in k or k.startswith("visual.") or "model.visual" in k]
    assert tower
    assert any(not torch.equal(pm[k], pm0[k]) for k in tower)  # trained
    rm_tower = {k.split("visual.", 1)[1]: v for k, v in rm.items() if "visual." in k}
    for k in tower:
        assert torch.equal(pm[k], rm_tower[k.split("visual.", 1)[1]])  # the RM starts from the same tower
