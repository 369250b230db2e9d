import numpy as np
import pytest

from caig_ray.config import MarketConfig
from caig_ray.imaging import place_product
from caig_ray.market import (
    ClickModel, ProceduralRenderer, bayes_ceiling, make_catalog, make_history, parse_description,
)
from caig_ray.market.language import SCENE_WORDS
from caig_ray.pairs import band_pairs

CATS = ["sneakers", "cosmetics", "electronics", "kitchen", "toys"]


def test_catalog_is_seeded():
    a = make_catalog(CATS, 10, 64, seed=3)
    b = make_catalog(CATS, 10, 64, seed=3)
    c = make_catalog(CATS, 10, 64, seed=4)
    assert [p.title for p in a] == [p.title for p in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert any(not np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, c))
    assert all(p.image.mode == "RGBA" and p.image.getchannel("A").getextrema() == (0, 255) for p in a)


def test_category_is_visible_in_pixels():
    """A nearest-centroid classifier on 16x16 thumbnails tells categories apart on held-out products."""
    prods = make_catalog(CATS, 200, 64, seed=0)
    feats = np.stack([np.asarray(p.image.resize((16, 16)), dtype=np.float32).ravel() for p in prods])
    labels = np.array([CATS.index(p.category) for p in prods])
    train, test = np.arange(0, 200, 2), np.arange(1, 200, 2)
    centroids = np.stack([feats[train][labels[train] == k].mean(0) for k in range(len(CATS))])
    pred = np.argmin(((feats[test][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == labels[test]).mean() > 0.9


def test_parse_description_language():
    bg = parse_description("A Bright arena with neon colorful props, busy busy")
    assert (bg.scene, bg.lighting, bg.palette, bg.clutter) == ("stadium", "bright", "vivid", "some")
    assert parse_description("zzz qqq").scene == "plain"  # unknown words are ignored
    assert parse_description("street then beach").scene == "street"  # first word wins


def test_procedural_renderer_keeps_product_and_is_seeded():
    prod = make_catalog(["cosmetics"], 1, 64, seed=0)[0]
    r = ProceduralRenderer(64)
    a, b, c, d = r.render([prod.image] * 4, ["stadium vivid busy", "stadium vivid busy", "stadium vivid busy",
                                             "pastel vanity minimal"], [1, 1, 2, 1])
    placed = place_product(prod.image, 64)
    solid = np.asarray(placed.getchannel("A")) == 255
    for ad in (a, b, c, d):
        assert np.array_equal(np.asarray(ad.image)[solid], np.asarray(placed.convert("RGB"))[solid])
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))  # the seed moves props
    bg = ~solid
    diff = np.abs(np.asarray(a.image, float) - np.asarray(d.image, float))[bg].mean()
    assert diff > 30  # the description visibly changes the background
    assert a.latent["scene"] == "stadium" and d.latent["scene"] == "vanity"
    # unknown words change nothing
    e = r.render([prod.image], ["stadium vivid busy gorgeous flibber"], [1])[0]
    assert np.array_equal(np.asarray(e.image), np.asarray(a.image))
    with pytest.raises(ValueError, match="one entry each"):
        r.render([prod.image], ["x", "y"], [1])


def _latent(scene, palette="neutral", lighting="soft", clutter="minimal", contrast=0.3):
    return dict(scene=scene, palette=palette, lighting=lighting, clutter=clutter, contrast=contrast)


def test_true_ctr_depends_on_background_and_category():
    m = ClickModel(MarketConfig(noise_std=0.0))
    assert m.true_ctr("cosmetics", _latent("vanity")) != m.true_ctr("cosmetics", _latent("kitchen"))
    assert m.true_ctr("cosmetics", _latent("vanity")) != m.true_ctr("kitchen", _latent("vanity"))
    assert m.true_ctr("toys", _latent("beach", "vivid")) > m.true_ctr("toys", _latent("beach", "dark"))


def test_world_v2_attention_is_a_main_effect_that_a_mismatch_still_loses():
    """World v2 (docs/market.md): each eye-catching scene suits several categories and lifts every one
    of them -- a main effect an RM can learn from history -- yet where it does not suit, the mismatch
    penalty makes it lose to a suitable plain scene: the lipstick-in-a-nightclub case."""
    cfg = MarketConfig(noise_std=0.0)
    m = ClickModel(cfg)
    for scene in cfg.attention_bonus:
        suits = [c for c in CATS if m.match(c, scene)]
        assert len(suits) >= 2 and len(suits) < len(CATS)  # several categories, not all
        for cat in suits:
            assert m.true_ctr(cat, _latent(scene)) > m.true_ctr(cat, _latent("studio"))
        for cat in set(CATS) - set(suits):
            assert m.true_ctr(cat, _latent(scene)) < m.true_ctr(cat, _latent("studio"))
    for cat in CATS:
        good = [m.true_ctr(cat, _latent(s)) for s in SCENE_WORDS if m.match(cat, s)]
        bad = [m.true_ctr(cat, _latent(s)) for s in SCENE_WORDS if not m.match(cat, s)]
        assert max(bad) < min(good)


def test_tier_is_in_the_text_only_and_changes_which_background_works():
    """Information only the product text carries: the tier is named in the title (and attributes),
    the image is drawn without it, and it reverses the dark-vs-vivid order."""
    cfg = MarketConfig(noise_std=0.0)
    m = ClickModel(cfg)
    prods = make_catalog(CATS, 60, 48, seed=0, tiers=cfg.tiers)
    assert {p.attributes["tier"] for p in prods} == set(cfg.tiers)
    for p in prods:
        assert m.tier_of(p.title) == p.attributes["tier"]
    premium, value = "premium red matte lipstick", "budget red matte lipstick"
    assert m.true_ctr("cosmetics", _latent("vanity", "dark"), title=premium) > m.true_ctr(
        "cosmetics", _latent("vanity", "vivid"), title=premium)
    assert m.true_ctr("cosmetics", _latent("vanity", "dark"), title=value) < m.true_ctr(
        "cosmetics", _latent("vanity", "vivid"), title=value)
    # the same draw of image and colour whatever the tiers: the tier is not in the pixels
    plain = make_catalog(CATS, 10, 48, seed=0)
    tiered = make_catalog(CATS, 10, 48, seed=0, tiers=cfg.tiers)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(plain, tiered))


def test_control_worlds_switch_one_mechanism_off():
    from caig_ray.config import load_config

    demo, no_att, never = (load_config(n) for n in ("demo", "demo-no-attention", "demo-never-mismatch"))
    assert demo.market.attention_bonus and no_att.market.attention_bonus == {}
    assert never.market.designer_match_rate == 1.0 and demo.market.designer_match_rate < 1.0
    for control in (no_att, never):  # everything else is the demo's
        a, b = control.model_dump(), demo.model_dump()
        a.pop("name"), b.pop("name")
        differing = [k for k in a["market"] if a["market"][k] != b["market"][k]]
        assert len(differing) == 1 and {k for k in a if a[k] != b[k]} == {"market"}


@pytest.fixture(scope="module")
def history():
    cfg = MarketConfig(n_products=60)
    prods = make_catalog(cfg.categories, cfg.n_products, 48, cfg.seed)
    return cfg, make_history(prods, cfg, progress=False)


def test_history_clicks_are_binomial(history):
    cfg, h = history
    imp = np.array([r["impressions"] for r in h.logs])
    clk = np.array([r["clicks"] for r in h.logs])
    ctr = np.array([t["true_ctr"] for t in h.truth])
    assert (clk <= imp).all() and (clk >= 0).all()
    assert imp.min() >= cfg.impressions[0] and imp.max() <= cfg.impressions[1]
    expected = (imp * ctr).sum()
    assert abs(clk.sum() - expected) < 4 * np.sqrt(expected)
    match = np.mean([t["match"] for t in h.truth])
    assert 0.85 < match <= 1.0  # designers mostly chose suitable scenes
    assert len({r["creative_id"] for r in h.logs}) == len(h.logs)


def test_history_is_reproducible(history):
    cfg, h = history
    prods = make_catalog(cfg.categories, cfg.n_products, 48, cfg.seed)
    h2 = make_history(prods, cfg, progress=False)
    assert [r["clicks"] for r in h.logs] == [r["clicks"] for r in h2.logs]


def test_bayes_ceiling_is_computed(history):
    cfg, h = history
    res = bayes_ceiling(h, cfg)
    # brute force, independently of band_pairs
    agree, n = 0, 0
    for i, a in enumerate(h.logs):
        for j, b in enumerate(h.logs):
            if j <= i or a["product_id"] != b["product_id"]:
                continue
            if min(a["impressions"], b["impressions"]) <= cfg.min_impressions:
                continue
            ca, cb = a["clicks"] / a["impressions"], b["clicks"] / b["impressions"]
            hi, lo = (i, j) if ca >= cb else (j, i)
            chi, clo = max(ca, cb), min(ca, cb)
            if clo > 0 and cfg.band[0] <= chi / clo <= cfg.band[1]:
                n += 1
                agree += h.truth[hi]["true_ctr"] > h.truth[lo]["true_ctr"]
    assert res["n_band_pairs"] == n > 20
    assert res["bayes_ceiling"] == pytest.approx(agree / n)
    assert 0.5 < res["bayes_ceiling"] < 1.0


def test_more_impressions_raise_the_ceiling():
    """Less binomial noise -> logged order agrees with the true order more often."""
    out = []
    for imp in ((1500, 3000), (100_000, 200_000)):
        cfg = MarketConfig(n_products=80, impressions=imp)
        prods = make_catalog(cfg.categories, cfg.n_products, 48, cfg.seed)
        out.append(bayes_ceiling(make_history(prods, cfg, progress=False), cfg)["bayes_ceiling"])
    assert out[1] > out[0]


def test_band_pairs_rule():
    pids = ["a", "a", "a", "b", "b"]
    imp = [2000, 2000, 500, 2000, 2000]
    clk = [100, 110, 10, 100, 200]
    pairs = band_pairs(pids, imp, clk, 1000, (1.05, 1.2))
    assert pairs == [(1, 0)]  # 1.10 ratio in band; row 2 under threshold; b's ratio 2.0 out of band
