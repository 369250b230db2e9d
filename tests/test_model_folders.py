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
    from jobs.generate import main

    rc = main(["--catalog", str(quick_world.catalog), "--out", str(tmp_path / "g"), "--policy",
               str(hub_models["qwen2_vl"]), "--rm", str(hub_models["qwen2_vl"])])
    assert rc == 2
    assert "--rm: " in capsys.readouterr().err and not (tmp_path / "g").exists()
