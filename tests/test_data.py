import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from caig_ray.data import DataError, read_catalog, read_click_logs, write_catalog, write_click_logs
from caig_ray.imaging import png_bytes
from caig_ray.market import make_catalog


@pytest.fixture
def products():
    return make_catalog(["sneakers", "toys"], 4, 48, seed=0)


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_catalog_round_trip(tmp_path, products, suffix):
    path = write_catalog(products, tmp_path / f"catalog{suffix}")
    back = read_catalog(path)
    assert [p.id for p in back] == [p.id for p in products]
    assert [p.title for p in back] == [p.title for p in products]
    assert [p.category for p in back] == [p.category for p in products]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(back, products))


def test_rgb_on_white_becomes_rgba(tmp_path):
    img = Image.new("RGB", (40, 40), "white")
    d = ImageDraw.Draw(img)
    d.ellipse([5, 5, 35, 35], fill=(200, 0, 0))
    d.ellipse([15, 15, 25, 25], fill="white")  # white inside the product stays product
    img.save(tmp_path / "p.png")
    (tmp_path / "c.json").write_text(json.dumps([{"id": 1, "image": "p.png", "new_caption": "red ring"}]))
    prod = read_catalog(tmp_path / "c.json")[0]
    alpha = np.asarray(prod.image.getchannel("A"))
    assert alpha[0, 0] == 0 and alpha[20, 20] == 255 and alpha[20, 8] == 255


def _catalog(tmp_path, rows):
    p = tmp_path / "catalog.json"
    p.write_text(json.dumps(rows))
    return p


def test_catalog_bad_inputs(tmp_path, products):
    products[0].image.save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="catalog file not found"):
        read_catalog(tmp_path / "missing.json")
    p = _catalog(tmp_path, [{"id": "a", "image": "ok.png", "new_caption": "t"},
                            {"id": "b", "image": "gone.png", "new_caption": "t"}])
    with pytest.raises(DataError, match=r"catalog\.json, row 1, field 'image': image file not found"):
        read_catalog(p)
    p = _catalog(tmp_path, [{"id": "a", "image": "broken.png", "new_caption": "t"}])
    with pytest.raises(DataError, match=r"row 0, field 'image': cannot decode image"):
        read_catalog(p)
    p = _catalog(tmp_path, [{"id": "a", "image": "ok.png", "new_caption": "t"},
                            {"id": "a", "image": "ok.png", "new_caption": "u"}])
    with pytest.raises(DataError, match=r"row 1, field 'id': duplicate id 'a' \(first at row 0\)"):
        read_catalog(p)
    p = _catalog(tmp_path, [{"id": "a", "image": "ok.png"}])
    with pytest.raises(DataError, match=r"row 0, field 'new_caption': missing"):
        read_catalog(p)
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_catalog(tmp_path / "bad.json")


def _log_rows(n=4):
    img = png_bytes(Image.new("RGB", (16, 16), (10, 200, 30)))
    return [{"product_id": f"p{i // 2}", "creative_id": f"c{i}", "image": img, "impressions": 1000,
             "clicks": 30 + i} for i in range(n)]


def test_click_logs_read_good(tmp_path):
    t = read_click_logs(write_click_logs(_log_rows(), tmp_path / "logs.parquet"))
    assert t.num_rows == 4 and t.column("clicks").to_pylist() == [30, 31, 32, 33]


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r[2].update(clicks=2000), r"row 2, field 'clicks': 2000 clicks > 1000 impressions"),
    (lambda r: r[1].update(clicks=-1), r"row 1, field 'clicks': negative \(-1\)"),
    (lambda r: r[3].update(impressions=-5, clicks=0), r"row 3, field 'impressions': negative \(-5\)"),
    (lambda r: r[3].update(creative_id="c0"), r"row 3, field 'creative_id': duplicate 'c0' \(first at row 0\)"),
    (lambda r: r[1].update(image=None), r"row 1, field 'image': image is missing"),
    (lambda r: r[0].update(image=b"\x89PNG garbage"), r"row 0, field 'image': cannot decode image"),
])
def test_click_logs_bad_rows_are_refused(tmp_path, mutate, message):
    rows = _log_rows()
    mutate(rows)
    path = write_click_logs(rows, tmp_path / "logs.parquet")
    with pytest.raises(DataError, match=message) as e:
        read_click_logs(path)
    assert str(path) in str(e.value)


def test_click_logs_every_bad_row_reported(tmp_path):
    rows = _log_rows(6)
    rows[1]["clicks"] = 5000
    rows[4]["clicks"] = -3
    with pytest.raises(DataError, match="2 bad row") as e:
        read_click_logs(write_click_logs(rows, tmp_path / "logs.parquet"))
    assert "row 1" in str(e.value) and "row 4" in str(e.value)


def test_click_logs_bad_files(tmp_path):
    with pytest.raises(DataError, match="click log file not found"):
        read_click_logs(tmp_path / "none.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"nope")
    with pytest.raises(DataError, match="not a readable parquet"):
        read_click_logs(tmp_path / "junk.parquet")
    rows = [{k: v for k, v in r.items() if k != "clicks"} for r in _log_rows()]
    with pytest.raises(DataError, match=r"missing column\(s\) \['clicks'\]"):
        read_click_logs(write_click_logs(rows, tmp_path / "noclicks.parquet"))
    # whole-number floats are read as counts (tests/test_bad_inputs.py); text is not a count
    t = pa.Table.from_pylist([{**r, "clicks": str(r["clicks"])} for r in _log_rows()])
    pq.write_table(t, tmp_path / "float.parquet")
    with pytest.raises(DataError, match="field 'clicks': must be integer counts, got string"):
        read_click_logs(tmp_path / "float.parquet")


def test_click_logs_image_paths(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ad.png")
    rows = _log_rows(2)
    for r in rows:
        r["image"] = "ad.png"
    assert read_click_logs(write_click_logs(rows, tmp_path / "l.parquet")).num_rows == 2
    rows[1]["image"] = "nowhere.png"
    with pytest.raises(DataError, match=r"row 1, field 'image': image file not found"):
        read_click_logs(write_click_logs(rows, tmp_path / "l.parquet"))
