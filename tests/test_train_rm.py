"""train-rm on 2 CPU workers (Ray Train + DeepSpeed over gloo); the checkpoint loads into RewardScorer."""


import pytest
import ray

from caig_ray.config import load_config
from caig_ray.data import load_log_image, read_click_logs
from caig_ray.imaging import png_bytes


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage", [2, 3])
def test_train_rm_zero_stage_and_reload_into_scorer(local_ray, quick_world, tmp_path, stage):
    from caig_ray.actors.scorer import RewardScorer
    from caig_ray.jobs.train_rm import train_rm

    cfg = load_config("quick", overrides={"train_rm": {"zero_stage": stage, "epochs": 1, "max_pairs": 24},
                                          "resources": {"reward_training": {"num_workers": 2}}})
    summary = train_rm(cfg, quick_world.root, tmp_path / "rm")
    assert summary["zero_stage"] == stage
    # Ray Train's equal shards of the 24 pairs: 12 a rank, the same number of whole batches on each
    assert summary["pairs_per_rank"] == 12 and summary["step"] == 12 // cfg.train_rm.batch_size >= 1
    assert (tmp_path / "rm" / "config.json").is_file()
    logs = read_click_logs(quick_world.click_logs, check_images=False)
    title = logs.column("title").to_pylist()
    rows = summary["probe_rows"]
    batch = {"left_image": [png_bytes(load_log_image(logs, a, quick_world.root)) for a, _ in rows],
             "right_image": [png_bytes(load_log_image(logs, b, quick_world.root)) for _, b in rows],
             "title": [title[a] for a, _ in rows], "rm_score": [True] * len(rows)}
    actor = ray.remote(num_cpus=1)(RewardScorer).remote(str(tmp_path / "rm"), cfg.reward.pair_image_size, batch_size=4)
    scored = ray.get(actor.__call__.remote(dict(batch)))
    assert scored["p_left"] == pytest.approx(summary["probe_p_left"], abs=1e-5)


@pytest.mark.slow
def test_evaluate_rm_reports_rm_baseline_and_ceiling(local_ray, quick_world, tmp_path):
    import json

    from caig_ray.jobs.evaluate_rm import evaluate_rm
    from caig_ray.jobs.train_rm import train_rm

    cfg = load_config("quick", overrides={"train_rm": {"zero_stage": 1, "epochs": 1, "max_pairs": 16}})
    train_rm(cfg, quick_world.root, tmp_path / "rm")
    res = evaluate_rm(cfg, quick_world.root, tmp_path / "rm", tmp_path / "rm_eval.json")
    assert json.loads((tmp_path / "rm_eval.json").read_text()) == res
    assert res["n_test_pairs"] > 5 and res["chance"] == 0.5
    for key in ("rm_accuracy_logged", "rm_debiased_accuracy_logged", "cnn_baseline_accuracy_logged",
                "bayes_ceiling_test_pairs", "rm_accuracy_true"):
        assert 0.0 <= res[key] <= 1.0
    assert res["bayes_ceiling_test_pairs"] > 0.5


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
