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


def test_driver_side_loads_use_resources_driver_models(quick_world, monkeypatch):
    """generate's policy (and evaluate-rm / the pretraining probe) load in the driver on the device
    and dtype of resources.driver_models -- not float32 on CPU whatever the preset says."""
    import caig_ray.models.policy as policy_mod
    from caig_ray.config import load_config
    from caig_ray.data import read_catalog
    from jobs.generate import write_descriptions

    seen = []
    real = policy_mod.load_policy

    def recording(path, dtype="float32", device="cpu"):
        model, processor = real(path, dtype, device)
        seen.append((next(model.parameters()).dtype, next(model.parameters()).device.type))
        return model, processor

    monkeypatch.setattr(policy_mod, "load_policy", recording)
    cfg = load_config("quick", overrides={"resources": {"driver_models": {"dtype": "bfloat16"}}})
    rows = write_descriptions(cfg, str(quick_world.policy), read_catalog(quick_world.catalog)[:2], 2, 0)
    assert len(rows) == 4 and seen == [(__import__("torch").bfloat16, "cpu")]
