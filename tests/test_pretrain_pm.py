"""pretrain-pm: TRL SFTTrainer inside Ray Train's TorchTrainer with DeepSpeed ZeRO-2 on 2 CPU workers."""

import pytest
import ray

from caig_ray.config import load_config
from caig_ray.data import read_catalog, read_click_logs
from caig_ray.sft_data import pretraining_examples


def test_pretraining_examples_cover_three_tasks(quick_world):
    from PIL import Image

    products = read_catalog(quick_world.catalog)[:5]
    logs = read_click_logs(quick_world.click_logs, check_images=False)
    blank = Image.new("RGB", (56, 56))
    ex = pretraining_examples(products, logs, lambda r: blank, lambda p: blank)
    assert {e["task"] for e in ex} == {"describe", "from_info", "rewrite"}
    descs = set(logs.column("description").to_pylist())
    assert all(e["completion"][0]["content"][0]["text"] in descs for e in ex)
    assert all(len(e["images"]) == 1 and e["prompt"][0]["role"] == "user" for e in ex)
    with pytest.raises(ValueError, match="no 'description' column"):
        pretraining_examples(products, logs.drop_columns(["description"]), lambda r: blank, lambda p: blank)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_pretrain_pm_job(quick_world, tmp_path):
    from caig_ray.models.policy import load_policy
    from caig_ray.jobs.pretrain_pm import pretrain_pm

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        cfg = load_config("quick", overrides={"pretrain": {"epochs": 1, "eval_products": 4}})
        summary = pretrain_pm(cfg, quick_world.root, tmp_path / "pm")
    finally:
        ray.shutdown()
    assert summary["steps"] >= 1 and summary["n_examples"] > 10 and summary["held_out_products"] == 4
    assert 0.0 <= summary["scene_word_share_after"] <= 1.0
    model, processor = load_policy(tmp_path / "pm")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
