"""The bad-input corpus (tests/data/bad/, written by tests/data/make_bad_inputs.py): one test per
class of input real data produces. Each is refused before any worker starts with a message naming
file, row and field -- or, valid but unusual, handled."""

import logging
from pathlib import Path

import numpy as np
import pytest

from caig_ray.data import DataError, read_catalog, read_click_logs

BAD = Path(__file__).parent / "data" / "bad"


@pytest.mark.parametrize("name, message", [
    ("legacy_encoding.json", r"legacy_encoding.json: not UTF-8 text \(byte \d+, line 1\)"),
    ("surrogate_title.json", r"row 0, field 'new_caption': not valid Unicode text \(an unpaired surrogate"),
    ("huge_title.json", r"row 0, field 'new_caption': 100000 characters, over the limit of 2000"),
    ("empty.json", r"empty.json: the catalog has no products"),
    ("bomb.json", r"row 1, field 'image': image too large to decode safely"),
    ("transparent.json", r"row 0, field 'image': the product image is fully transparent"),
    ("dir_image.json", r"row 1, field 'image': .*a_folder is a directory, not an image file"),
])
def test_a_bad_catalog_is_refused_naming_file_row_and_field(name, message):
    with pytest.raises(DataError, match=message) as err:
        read_catalog(BAD / name)
    assert str(BAD / name) in str(err.value)


def test_unusual_but_valid_images_and_scripts_are_read(caplog):
    """16-bit grayscale (once turned fully transparent), palette, CMYK JPEG, grayscale, an opaque photo
    (accepted with a warning: no matte, the whole image is the product), and titles in other scripts."""
    with caplog.at_level(logging.WARNING, logger="caig_ray.data.catalog"):
        products = read_catalog(BAD / "unusual_images.json")
    assert len(products) == 6 and all(p.image.mode == "RGBA" for p in products)
    gray16 = np.asarray(products[0].image)
    assert gray16[..., 3].any() and gray16[..., :3].max() > 150 and gray16[..., :3].min() < 20  # a ramp survives
    cmyk = np.asarray(products[2].image)[..., :3]
    assert cmyk.mean(axis=(0, 1))[0] > 200 and cmyk.mean(axis=(0, 1))[1] < 120  # CMYK red-ish stays red-ish
    assert products[5].title == "红色运动鞋 / Кроссовки / حذاء رياضي"
    assert any("row 4" in r.getMessage() and "no alpha matte" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name, message", [
    ("no_rows.parquet", r"no_rows.parquet: the click log has no rows"),
    ("nan_counts.parquet", r"row 1, field 'impressions': not a whole count \(1500.5\)[\s\S]*row 0, field 'clicks': "
                           r"not a whole count \(nan\)"),
])
def test_a_bad_click_log_is_refused_naming_the_rows(name, message):
    with pytest.raises(DataError, match=message):
        read_click_logs(BAD / name)


def test_whole_counts_stored_as_floats_are_read_as_integers():
    table = read_click_logs(BAD / "float_counts.parquet")
    assert table.column("clicks").to_pylist() == [40, 35] and str(table.schema.field("clicks").type) == "int64"


def test_a_click_log_with_no_training_pair_is_refused_before_ray_train_starts(quick_world, tmp_path):
    """No product with two creatives: refused in the driver (Ray Train used to start, fail, retry)."""
    import ray

    from caig_ray.config import load_config
    from caig_ray.jobs.train_rm import train_rm

    cfg = load_config("quick", overrides={"data": {"click_logs": str(BAD / "no_pairs.parquet")},
                                          "reward": {"backbone_path": str(quick_world.reward)}})
    with pytest.raises(DataError, match=r"no_pairs.parquet: 0 training pair\(s\) for 2 worker\(s\)"):
        train_rm(cfg, None, tmp_path / "rm")  # no --world: the config's data.click_logs
    assert not ray.is_initialized()


def test_generate_with_no_description_per_product_is_a_usage_error(capsys):
    from caig_ray.jobs.generate import main

    with pytest.raises(SystemExit) as code:
        main(["--catalog", "c.json", "--out", "o", "--policy", "p", "--rm", "r", "--n", "0"])
    assert code.value.code == 2 and "--n: must be at least 1" in capsys.readouterr().err
