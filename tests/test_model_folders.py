"""Model folders are refused up front -- before Ray, sampling or rendering -- with the setting, the
path and what is missing (issue 11: a bad --rm was found only after everything was rendered, a bad
--policy gave a hub traceback)."""

import shutil

import pytest

from caig_ray.models.vlm import ModelFolderError, check_model_folder


def test_each_family_passes_and_a_plain_checkpoint_is_not_an_rm(hub_models):
    for family in ("llava_next", "qwen2_vl", "qwen2_5_vl"):
        assert check_model_folder(hub_models[family], "--policy") == family
        with pytest.raises(ModelFolderError, match=r"--rm: .* not a trained reward model"):
            check_model_folder(hub_models[family], "--rm", kind="reward")


def test_missing_and_broken_folders_name_what_is_missing(hub_models, tmp_path):
    with pytest.raises(ModelFolderError, match=f"--policy: model folder not found: {tmp_path / 'nope'}"):
        check_model_folder(tmp_path / "nope", "--policy")
    with pytest.raises(ModelFolderError, match="has no config.json"):
        check_model_folder(tmp_path, "--policy")
    broken = tmp_path / "llava"
    shutil.copytree(hub_models["llava_next"], broken)
    (broken / "model.safetensors").unlink()
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelFolderError, match=r"missing weights .*; a tokenizer"):
        check_model_folder(broken, "--policy")


def test_generate_refuses_a_bad_rm_before_sampling(quick_world, hub_models, tmp_path, capsys):
    from caig_ray.jobs.generate import main

    rc = main(["--preset", "quick", "--catalog", str(quick_world.catalog), "--out", str(tmp_path / "g"), "--policy",
               str(hub_models["qwen2_vl"]), "--rm", str(hub_models["qwen2_vl"])])
    assert rc == 2
    assert "--rm: " in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_generate_policy_actors_load_with_resources_generators(quick_world):
    """generate's policy runs in Describer actors on resources.generators' device and dtype -- not in
    the driver, and not float32 on CPU whatever the preset says."""
    import json

    import pyarrow as pa
    import torch

    from caig_ray.actors.describer import Describer
    from caig_ray.config import load_config
    from caig_ray.data import read_catalog
    from caig_ray.imaging import png_bytes

    cfg = load_config("quick", overrides={"resources": {"generators": {"dtype": "bfloat16"}}})
    where = cfg.resources.generators
    describer = Describer(str(quick_world.policy), cfg.policy, 2, 7, where.device, where.dtype)
    assert next(describer.model.parameters()).dtype == torch.bfloat16
    products = read_catalog(quick_world.catalog)[:2]
    out = describer(pa.Table.from_pylist([
        {"row": 10 + i, "id": p.id, "title": p.title, "category": p.category, "attributes": json.dumps(p.attributes),
         "image_path": None, "image_bytes": png_bytes(p.image)} for i, p in enumerate(products)])).to_pylist()
    assert [len(r["descriptions"]) for r in out] == [2, 2] and [r["seed"] for r in out] == [17, 18]
