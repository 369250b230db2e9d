"""caig-ray generate: one streaming pipeline from a CAIG-format catalog to ranked ads, bad rows never
lost, and a killed run resumed writing every product exactly once."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from caig_ray.config import load_config, save_config
from caig_ray.data import DataError, read_catalog, write_catalog
from caig_ray.imaging import place_product

ROOT = Path(__file__).resolve().parents[1]


def _caig_tiny_dataset(products, root: Path, extra_rows=()) -> Path:
    """CAIG's own layout: ``tiny_dataset/tiny.json`` naming ``tiny_dataset/images/<id>.png`` (relative
    to the JSON's parent folder, not to the JSON's own folder)."""
    folder = root / "tiny_dataset"
    (folder / "images").mkdir(parents=True)
    rows = []
    for p in products:
        p.image.save(folder / "images" / f"{p.id}.png")
        rows.append({"id": p.id, "image": f"tiny_dataset/images/{p.id}.png", "new_caption": p.title})
    (folder / "tiny.json").write_text(json.dumps(rows + list(extra_rows), ensure_ascii=False))
    return folder / "tiny.json"


def test_generate_rows_are_typed_stage_by_stage(quick_world):
    """generate's three model stages, called in process as their pool actors call them, on validated
    catalog rows (caig_ray.rows.CATALOG_ROW_SCHEMA): every block between them is a
    ``ProductCandidates`` table of exactly its schema, round-trips through it, and each stage fills its
    own fields (descriptions -> ads -> ranks)."""
    import pyarrow as pa

    from caig_ray.actors.describer import Describer
    from caig_ray.actors.renderer import CandidateRenderer
    from caig_ray.actors.scorer import CandidateRanker
    from caig_ray.imaging import png_bytes
    from caig_ray.rows import CATALOG_ROW_SCHEMA, ProductCandidates

    cfg = load_config("quick")
    products = read_catalog(quick_world.catalog)[:3]
    catalog_rows = pa.Table.from_pylist([
        {"row": i, "id": p.id, "title": p.title, "category": p.category, "attributes": json.dumps(p.attributes),
         "image_path": None, "image_bytes": png_bytes(p.image)} for i, p in enumerate(products)], schema=CATALOG_ROW_SCHEMA)
    described = Describer(str(quick_world.policy), cfg.policy, 3, 5)(catalog_rows)
    rendered = CandidateRenderer(cfg.renderer)(described)
    ranked = CandidateRanker(str(quick_world.reward), cfg.reward.pair_image_size, batch_size=4)(rendered)
    for block in (described, rendered, ranked):
        assert block.schema == ProductCandidates.SCHEMA
        assert ProductCandidates.table(ProductCandidates.from_table(block)).equals(block)
    rows = ProductCandidates.from_table(ranked)
    assert [r.id for r in rows] == [p.id for p in products] and [r.seed for r in rows] == [5, 6, 7]
    for r in rows:
        assert len(r.descriptions) == len(r.duplicate) == len(r.ads) == len(r.win_rate) == len(r.ctr) == 3
        assert sorted(r.rank) == [0, 1, 2] and all(0 <= w <= 1 for w in r.win_rate)
        assert all(Image.open(io.BytesIO(ad)).size == (cfg.renderer.image_size,) * 2 for ad in r.ads)
    assert all(r.ads == [] and r.rank == [] for r in ProductCandidates.from_table(described))


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_generate_from_any_working_directory_bad_rows_stop_or_go_to_rejects(quick_world, tmp_path, monkeypatch):
    """One CAIG-layout catalog with 6 good and 3 bad rows, run from another folder: the default stops
    before any model loads, naming every bad row; ``reject`` writes ranked ads for the 6 and the 3
    to rejects/ (6 + 3 = 9 read: none lost)."""
    from caig_ray.jobs.generate import generate

    products = read_catalog(quick_world.catalog)[:6]
    transparent = tmp_path / "shop" / "transparent.png"
    transparent.parent.mkdir(parents=True)
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(transparent)
    bad = [{"id": "gone", "image": "tiny_dataset/images/not_there.png", "new_caption": "a lamp"},
           {"id": "clear", "image": str(transparent), "new_caption": "a cup"},
           {"id": "untitled", "image": f"tiny_dataset/images/{products[0].id}.png", "new_caption": ""}]
    catalog = _caig_tiny_dataset(products, tmp_path / "shop", bad)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config("quick")
    args = (str(quick_world.policy), str(quick_world.reward))

    with pytest.raises(DataError) as err:
        generate(cfg, catalog, tmp_path / "stopped", *args, n=3)
    msg = str(err.value)
    assert "3 bad row(s) of 9" in msg and "row 6, field 'image': image file not found" in msg
    assert "parent" in msg  # the lookup rule is said
    assert "row 7, field 'image': the product image is fully transparent" in msg
    assert "row 8, field 'new_caption'" in msg
    assert not (tmp_path / "stopped" / "candidates").exists()  # nothing generated
    assert pq.read_table(tmp_path / "stopped" / "catalog" / "rejects").num_rows == 3

    summary = generate(cfg, catalog, tmp_path / "out", *args, n=3, on_bad_rows="reject")
    assert summary["products"] == 6 and summary["candidates"] == 18
    assert summary["rejected_rows"] == 3 and summary["catalog_rows"] == 9
    rejects = pq.read_table(tmp_path / "out" / "catalog" / "rejects").to_pylist()
    assert sorted(r["row"] for r in rejects) == [6, 7, 8]
    assert {json.loads(r["raw"])["id"] for r in rejects} == {"gone", "clear", "untitled"}
    assert all(f"row {r['row']}," in r["error"] for r in rejects)
    cands = pq.read_table(tmp_path / "out" / "candidates").to_pylist()
    assert len(cands) == 18 and len({(c["product_id"], c["candidate"]) for c in cands}) == 18
    for pid in {c["product_id"] for c in cands}:
        mine = [c for c in cands if c["product_id"] == pid]
        assert sorted(c["rank"] for c in mine) == [0, 1, 2]
        assert len({c["seed"] for c in mine}) == 1  # the same seed for every candidate of a product
        best_first = sorted(mine, key=lambda c: c["rank"])
        assert best_first[0]["win_rate"] >= best_first[-1]["win_rate"]
    by_id = {p.id: p for p in products}
    size, fill = cfg.renderer.image_size, cfg.renderer.product_fill
    for c in cands:
        ad = np.asarray(Image.open(tmp_path / "out" / c["ad_path"]).convert("RGB"))
        placed = place_product(by_id[c["product_id"]].image, size, fill)
        solid = np.asarray(placed.getchannel("A")) == 255
        assert np.array_equal(ad[solid], np.asarray(placed.convert("RGB"))[solid])  # product pixels kept
    best = pq.read_table(tmp_path / "out" / "best").to_pylist()
    assert len(best) == 6 and all(b["rank"] == 0 for b in best)
    page = (tmp_path / "out" / "gallery.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == 18 and all((tmp_path / "out" / s).is_file() for s in srcs)


def test_generate_ranking_is_serves_ranking():
    """generate's RewardScorer and Serve's /v1/rank rank from the same function."""
    from caig_ray.scoring import rank_round_robin, round_robin

    # 3 candidates: 0 beats 1 (0.8), 0 loses to 2 (0.3), 1 loses to 2 (0.1)
    win_rate, ctr, order = rank_round_robin(3, [0.8, 0.3, 0.1], [0.01, 0.02, 0.03], [0.04, 0.05, 0.06])
    assert round_robin(3) == [(0, 1), (0, 2), (1, 2)]
    assert order == [2, 0, 1] and np.allclose(win_rate, [0.55, 0.15, 0.8]) and np.allclose(ctr, [0.015, 0.035, 0.055])
    import caig_ray.jobs.serve_rm as serve

    assert serve.rank_round_robin is rank_round_robin


def test_duplicate_ids_and_file_level_errors_stop_before_anything_runs(quick_world, tmp_path):
    import ray

    from caig_ray.dataplane.catalog import validate_catalog

    products = read_catalog(quick_world.catalog)[:3]
    products[2].id = products[0].id
    catalog = write_catalog(products, tmp_path / "dups" / "catalog.parquet")
    (tmp_path / "latin1.json").write_bytes('[{"id": "1", "new_caption": "Café"}]'.encode("latin-1"))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        with pytest.raises(DataError, match=rf"field 'id': duplicate id\(s\) '{products[0].id}' \(2 rows\)"):
            validate_catalog(catalog, tmp_path / "out_dups")
        with pytest.raises(DataError, match=r"latin1.json: not UTF-8 text \(byte 32, line 1\)"):
            validate_catalog(tmp_path / "latin1.json", tmp_path / "out_latin1")
        folder = tmp_path / "folder"
        folder.mkdir()
        for p in products[:2]:
            p.image.save(folder / f"{p.id}.png")
        (folder / f"{products[0].id}.txt").write_text("红色运动鞋", encoding="utf-8")
        check = validate_catalog(folder, tmp_path / "out_folder")
        rows = pq.read_table(check.valid).to_pylist()
        assert check.valid_rows == 2 and {r["title"] for r in rows} >= {"红色运动鞋"}
        # the online loop's driver keeps a reference per product, and the image behind it is the one
        # read_catalog gives, pixel for pixel: by path (a folder) and by a valid part's row (bytes in parquet)
        from caig_ray.dataplane.catalog import catalog_records
        from caig_ray.data.catalog import load_product_image

        by_bytes = catalog_records(validate_catalog(write_catalog(products[:2], tmp_path / "ok.parquet"),
                                                    tmp_path / "out_ok").valid)
        by_path = catalog_records(check.valid)
        assert all(re.search(r"/valid/part-\d+\.parquet#\d+$", r.image_ref) for r in by_bytes)
        assert all(Path(r.image_ref).is_file() for r in by_path)
        for records in (by_bytes, by_path):
            assert sorted(r.id for r in records) == sorted(p.id for p in products[:2])
            for r in records:
                want = next(p for p in products if p.id == r.id).image
                assert np.array_equal(np.asarray(load_product_image(r.image_ref)), np.asarray(want))
        # click-log images are decoded on the cluster, in parallel tasks; every bad row is named
        from caig_ray.dataplane.catalog import check_click_log_images
        from caig_ray.data import write_click_logs
        from caig_ray.imaging import png_bytes

        good = png_bytes(products[0].image)
        log = write_click_logs([{"product_id": "p", "creative_id": f"c{i}", "impressions": 10, "clicks": 1,
                                 "image": b"not an image" if i in (3, 7) else good} for i in range(9)],
                               tmp_path / "log.parquet")
        with pytest.raises(DataError, match=r"2 bad row\(s\) in the click log:\n  .*row 3, field 'image': cannot "
                                            r"decode image[\s\S]*row 7, field 'image'"):
            check_click_log_images(log, rows_per_task=4)
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_generate_resumed_after_a_kill_writes_each_product_exactly_once(quick_world, tmp_path):
    """The job is SIGKILLed once some products are written (renderers given a simulated latency so
    that it is mid-run); --resume writes the rest: every (product, candidate) once, in candidates/
    and best/, and the ads on disk are the ones the parquet names."""
    products = read_catalog(quick_world.catalog)[:12]  # 3 blocks of 4 at generate_batch_size 4
    catalog = write_catalog(products, tmp_path / "shop" / "catalog.json")
    cfg = load_config("quick", overrides={"renderer": {"simulated_latency_s": 0.3, "batch_size": 4},
                                          "policy": {"generate_batch_size": 4}, "online": {"scorer_batch_size": 2}})
    save_config(cfg, tmp_path / "slow.yaml")
    cmd = [sys.executable, "-m", "caig_ray.jobs.generate", "--config", str(tmp_path / "slow.yaml"), "--catalog", str(catalog),
           "--out", str(tmp_path / "out"), "--policy", str(quick_world.policy), "--rm", str(quick_world.reward),
           "--n", "2"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    cands = tmp_path / "out" / "candidates"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (cands.is_dir() and any(cands.glob("*.parquet"))):
            assert proc.poll() is None, "generate ended before the kill"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started (its own session)
    finally:
        proc.wait(timeout=60)
    written_before = pq.read_table(cands).num_rows // 2
    assert 0 < written_before < 12, written_before
    other = subprocess.run(cmd[:-1] + ["3", "--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)  # other settings would mix two runs' ads: refused, nothing written
    assert other.returncode == 2 and "holds ads made with other n" in other.stderr, other.stderr[-2000:]
    assert pq.read_table(cands).num_rows // 2 == written_before
    done = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "generate_summary.json").read_text())
    assert summary["already_written"] == written_before and summary["written_this_run"] == 12 - written_before
    rows = pq.read_table(cands).to_pylist()
    keys = [(r["product_id"], r["candidate"]) for r in rows]
    assert len(keys) == len(set(keys)) == 24 and {k[0] for k in keys} == {p.id for p in products}
    best = pq.read_table(tmp_path / "out" / "best").to_pylist()
    assert sorted(b["product_id"] for b in best) == sorted(p.id for p in products)
    assert all((tmp_path / "out" / r["ad_path"]).is_file() for r in rows)
