"""train-rm: bad click logs are refused before a worker starts; the pairs dataset takes each pair's own ads. The
job itself (Ray Train + DeepSpeed over gloo on 2 ranks, ZeRO-1, 2 and 3, the checkpoint reloaded into the
scorer) runs in tests/test_families_entrypoints.py, tests/test_storage.py, tests/test_job_submit.py and the demo."""


import pytest

from caig_ray.config import load_config


def test_train_rm_refuses_bad_click_logs_before_starting_workers(quick_world, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from caig_ray.data import DataError
    from caig_ray.jobs.train_rm import train_rm

    world = tmp_path / "w"
    shutil.copytree(quick_world.root, world, ignore=shutil.ignore_patterns("models"))
    rows = pq.read_table(world / "click_logs.parquet").to_pylist()
    rows[3]["clicks"] = rows[3]["impressions"] + 1
    pq.write_table(pa.Table.from_pylist(rows), world / "click_logs.parquet")
    with pytest.raises(DataError, match=r"row 3, field 'clicks'"):
        train_rm(load_config("quick"), world, tmp_path / "rm")
    assert not (tmp_path / "rm").exists()


def test_rm_pairs_dataset_takes_each_pairs_own_ads_from_the_log(quick_world):
    """The map that feeds the trainers' shards reads, for each pair, the log's own rows (by number,
    in the pair's order) and the left row's title."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from caig_ray.data.clicklogs import pair_images

    log = pq.read_table(quick_world.click_logs)
    pairs = pa.table({"left_row": [5, 0, 9], "right_row": [1, 7, 2], "label": [0, 1, 1]})
    out = pair_images(pairs, str(quick_world.click_logs))
    assert out["left_image"].to_pylist() == [log["image"][i].as_py() for i in (5, 0, 9)]
    assert out["right_image"].to_pylist() == [log["image"][i].as_py() for i in (1, 7, 2)]
    assert out["title"].to_pylist() == [log["title"][i].as_py() for i in (5, 0, 9)]
    assert out["label"].to_pylist() == [0, 1, 1]
