"""caig-ray generate on a CAIG-format JSON catalog of RGBA PNGs: ads, ranks and the gallery."""

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from caig_ray.config import load_config
from caig_ray.data import read_catalog, write_catalog
from caig_ray.imaging import place_product


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_generate_writes_ranked_ads_and_gallery(quick_world, tmp_path):
    from jobs.generate import generate

    products = read_catalog(quick_world.catalog)[:6]
    catalog = write_catalog(products, tmp_path / "shop" / "catalog.json")
    cfg = load_config("quick")
    summary = generate(cfg, catalog, tmp_path / "out", str(quick_world.policy), str(quick_world.reward), n=3)
    assert summary["products"] == 6 and summary["candidates"] == 18
    cands = pq.read_table(tmp_path / "out" / "candidates.parquet").to_pylist()
    assert len(cands) == 18 and len({(c["product_id"], c["candidate"]) for c in cands}) == 18
    for pid in {c["product_id"] for c in cands}:
        mine = [c for c in cands if c["product_id"] == pid]
        assert sorted(c["rank"] for c in mine) == [0, 1, 2]
        assert len({c["seed"] for c in mine}) == 1  # the same seed for every candidate of a product
    by_id = {p.id: p for p in products}
    size, fill = cfg.renderer.image_size, cfg.renderer.product_fill
    for c in cands:
        ad = np.asarray(Image.open(tmp_path / "out" / c["ad_path"]).convert("RGB"))
        placed = place_product(by_id[c["product_id"]].image, size, fill)
        solid = np.asarray(placed.getchannel("A")) == 255
        assert np.array_equal(ad[solid], np.asarray(placed.convert("RGB"))[solid])
    best = pq.read_table(tmp_path / "out" / "best.parquet").to_pylist()
    assert len(best) == 6 and all(b["rank"] == 0 for b in best)
    page = (tmp_path / "out" / "gallery.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == 18 and all((tmp_path / "out" / s).is_file() for s in srcs)
