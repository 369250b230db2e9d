import pytest

from caig_ray.config import PRESETS, CaigConfig, ConfigError, load_config, save_config


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_validate(name):
    cfg = load_config(name)
    assert isinstance(cfg, CaigConfig)
    assert cfg.name == name


def test_gpu_cluster_preset_names_real_checkpoints():
    cfg = load_config("gpu-cluster")
    assert cfg.renderer.kind == "diffusers" and cfg.renderer.sd_path and cfg.renderer.controlnet_path
    assert cfg.policy.model_path and cfg.policy.dtype == "bfloat16"


def _write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, "market:\n  n_prodcts: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "market.n_prodcts" in str(e.value) and str(p) in str(e.value)


def test_wrong_type_names_key_and_file(tmp_path):
    p = _write(tmp_path, "renderer:\n  steps: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "renderer.steps" in str(e.value) and str(p) in str(e.value) and "'many'" in str(e.value)


def test_wrong_value_names_key_and_file(tmp_path):
    p = _write(tmp_path, "renderer:\n  kind: dalle\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "renderer.kind" in str(e.value) and str(p) in str(e.value)
    p = _write(tmp_path, "market:\n  band: [1.3, 1.1]\n")
    with pytest.raises(ConfigError, match="band"):
        load_config(p)


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("quick", overrides={"market": {"n_products": 7}})
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert cfg.market.n_products == 7
