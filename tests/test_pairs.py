import numpy as np
import pyarrow as pa

from caig_ray.pairs import mine_rm_pairs, split_products


def _logs(n_products=30, per=5, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_products):
        base = rng.uniform(0.02, 0.05)
        for k in range(per):
            imp = int(rng.choice([500, 5000]))
            rows.append({"product_id": f"p{p}", "creative_id": f"p{p}-{k}", "image": b"",
                         "impressions": imp, "clicks": int(imp * base * rng.uniform(0.9, 1.3))})
    return pa.Table.from_pylist(rows)


def test_mined_pairs_follow_threshold_band_and_product_split():
    logs = _logs()
    pairs = mine_rm_pairs(logs, 1000, (1.05, 1.2), test_fraction=0.3, seed=1)
    assert len(pairs) > 20
    imp, clk = logs.column("impressions").to_pylist(), logs.column("clicks").to_pylist()
    for p in pairs:
        cl, cr = clk[p["left_row"]] / imp[p["left_row"]], clk[p["right_row"]] / imp[p["right_row"]]
        assert imp[p["left_row"]] > 1000 and imp[p["right_row"]] > 1000
        assert 1.05 <= max(cl, cr) / min(cl, cr) <= 1.2
        assert p["label"] == (0 if cl >= cr else 1)
        assert p["product_id"] == logs.column("product_id")[p["left_row"]].as_py()
    train = {p["product_id"] for p in pairs if p["split"] == "train"}
    test = {p["product_id"] for p in pairs if p["split"] == "test"}
    assert train and test and not train & test
    for split in ("train", "test"):
        labels = [p["label"] for p in pairs if p["split"] == split]
        assert abs(sum(labels) - len(labels) / 2) <= 0.5
    assert pairs == mine_rm_pairs(logs, 1000, (1.05, 1.2), test_fraction=0.3, seed=1)
    other = mine_rm_pairs(logs, 1000, (1.05, 1.2), test_fraction=0.3, seed=2)
    assert [p["label"] for p in other] != [p["label"] for p in pairs]


def test_split_products_is_disjoint_and_seeded():
    ids = [f"p{i}" for i in range(50)] * 2
    tr, te = split_products(ids, 0.2, 0)
    assert len(te) == 10 and len(tr) == 40 and not tr & te
    assert split_products(ids, 0.2, 0) == (tr, te)


def _scored(i, a, b, seed=1, **extra):
    from caig_ray.rows import ScoredPair

    return ScoredPair(pair_id=f"r0-{i}", kind="train", round=0, product_id=f"p{i}", title="t", category="c",
                      instruction="ins", desc_a=a, desc_b=b, seed=seed, policy_version=0, image_ref="shop/p.png",
                      **extra)


def test_preference_examples_pick_by_rm_and_skip_duplicates():
    import pytest

    from caig_ray.pairs import preference_examples

    cands = [_scored(i, a, b, seed=7) for i, (a, b) in enumerate([("stadium", "vanity"), ("beach", "beach "),
                                                                 ("neon", "desk")])]
    ex, skipped = preference_examples(cands, [0.7, 0.9, 0.2])
    assert skipped == [{"pair_id": "r0-1", "reason": "duplicate"}]
    assert [(e.chosen, e.rejected) for e in ex] == [("stadium", "vanity"), ("desk", "neon")]
    assert ex[1].p_chosen == pytest.approx(0.8) and all(e.seed == 7 for e in ex)
    assert all(e.image_ref == "shop/p.png" and e.instruction == "ins" for e in ex)
    with pytest.raises(ValueError, match="3 candidate pairs but 2 scores"):
        preference_examples(cands, [0.5, 0.5])


def test_accounting_finds_lost_and_duplicated_pairs():
    from caig_ray.pairs import account

    ok = account(["a", "b", "c"], trained=["a", "c"], skipped=["b"])
    assert ok == {"pairs_planned": 3, "pairs_trained": 2, "pairs_skipped": 1, "pairs_lost": 0,
                  "pairs_duplicated": 0}
    bad = account(["a", "b", "c"], trained=["a", "a", "x"], skipped=[])
    assert bad["pairs_lost"] == 2 and bad["pairs_duplicated"] == 2  # a twice; x never planned


def test_ties_are_skipped_and_the_sampled_ids_travel_with_the_choice():
    from caig_ray.pairs import preference_examples

    cands = [_scored(i, f"a{i}", f"b{i}", ids_a=[1, i], ids_b=[2, i], same_ad=i == 0) for i in range(4)]
    # 0: the two ads are identical pixel for pixel (RM says 0.9 anyway); 1: 0.505 is within the margin;
    # 2: exactly 0.5 (the old rule handed it to the first sample); 3: a clear preference for b
    ex, skipped = preference_examples(cands, [0.9, 0.505, 0.5, 0.2], tie_margin=0.01)
    assert skipped == [{"pair_id": f"r0-{i}", "reason": "tie"} for i in range(3)]
    assert len(ex) == 1 and ex[0].chosen == "b3" and ex[0].chosen_ids == [2, 3] and ex[0].rejected_ids == [1, 3]
    ex, skipped = preference_examples(cands[1:], [0.505, 0.5, 0.2], tie_margin=0.0)  # margin 0: only exact 0.5
    assert [e.chosen for e in ex] == ["a1", "b3"] and skipped == [{"pair_id": "r0-2", "reason": "tie"}]
    ex, skipped = preference_examples(cands, [0.9, 0.505, 0.5, 0.2], tie_margin=None)  # CAIG scripts' rule
    assert [e.chosen for e in ex] == ["a0", "a1", "a2", "b3"] and not skipped


def test_rm_pairs_get_their_left_right_order_drawn_again_each_epoch():
    from caig_ray.pairs import redraw_pair

    def redraw_order(pairs, seed, epoch):
        return [redraw_pair(p, seed, epoch) for p in pairs]

    pairs = [{"left_row": 2 * i, "right_row": 2 * i + 1, "left_creative": f"c{2 * i}", "right_creative": f"c{2 * i + 1}",
              "ctr_left": 0.02, "ctr_right": 0.01, "label": 0} for i in range(200)]
    assert redraw_order(pairs, 0, 0) == pairs
    e1, e2 = redraw_order(pairs, 0, 1), redraw_order(pairs, 0, 2)
    assert e1 == redraw_order(pairs, 0, 1) and e1 != e2  # seeded, and different per epoch
    swapped = [q for q in e1 if q["label"] == 1]
    assert 60 < len(swapped) < 140  # about half
    for p, q in zip(pairs, e1):
        if q["label"] == 1:  # a swap keeps every field with its own side
            assert (q["left_row"], q["right_row"], q["ctr_left"], q["ctr_right"], q["left_creative"]) == (
                p["right_row"], p["left_row"], p["ctr_right"], p["ctr_left"], p["right_creative"])
        else:
            assert q == p
