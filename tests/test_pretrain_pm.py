"""pretrain-pm: its examples cover three tasks. The job itself (TRL SFTTrainer in Ray Train, DeepSpeed over gloo)
runs in every family chain (tests/test_families_entrypoints.py, tests/test_storage.py) and in the demo."""

import pytest

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
