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
