import pytest
import yaml

from caig_ray.config import PRESETS, CaigConfig, ConfigError, load_config, load_config_described, save_config


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_validate(name):
    cfg = load_config(name)
    assert isinstance(cfg, CaigConfig)
    assert cfg.name == name


def test_gpu_cluster_preset_names_real_checkpoints():
    cfg = load_config("gpu-cluster")
    assert cfg.renderer.kind == "diffusers" and cfg.renderer.sd_path and cfg.renderer.controlnet_path
    assert cfg.policy.model_path and cfg.resources.policy.dtype == "bfloat16"


def test_gpu_cluster_preset_has_no_role_on_cpu_or_a_tiny_default():
    """Every role on GPUs in 16-bit, CAIG's optimisation, native policy input, the RM from the PM."""
    cfg = load_config("gpu-cluster")
    for role, placement in cfg.resources:
        assert placement.use_gpu and placement.device == "cuda", f"resources.{role} falls back to CPU"
        expected = "float16" if role == "renderers" else "bfloat16"
        assert placement.dtype == expected, f"resources.{role}.dtype is {placement.dtype}"
    tiny = CaigConfig()  # the embedded defaults a preset must not fall back to
    for section in ("policy", "train_rm", "pretrain"):
        block = getattr(cfg, section)
        assert block.lr == 2e-5 and block.lr_schedule == "cosine" and block.warmup_ratio > 0, section
    assert cfg.pretrain.lr != tiny.pretrain.lr and cfg.train_rm.lr != tiny.train_rm.lr
    assert cfg.policy.image_size is None  # the checkpoint's native input size, not the tiny 56 px
    assert cfg.policy.lora.r == 128 and cfg.policy.lora.alpha == 256
    assert cfg.reward.backbone_path and cfg.reward.pair_image_size == 512
    assert cfg.renderer.scheduler == "euler_ancestral" and cfg.renderer.image_size == 512
    assert cfg.resources.policy.num_workers == 8 and cfg.policy.zero_stage == 3
    # a 7B fits (issue 12): micro-batches, checkpointing, the reference as a ZeRO-3 engine
    assert cfg.policy.micro_batch_size == 2 and cfg.policy.gradient_checkpointing
    assert cfg.policy.reference == "zero3" and cfg.policy.generate_batch_size <= 8


def test_device_is_derived_never_set():
    """One way to say where a role runs: a `device`/`use_gpu` key is refused, num_gpus decides."""
    with pytest.raises(ConfigError, match="renderer.device"):
        load_config("quick", overrides={"renderer": {"device": "cuda"}})
    with pytest.raises(ConfigError, match="policy.use_gpu"):
        load_config("quick", overrides={"policy": {"use_gpu": True}})
    cfg = load_config("quick", overrides={"resources": {"scorers": {"num_gpus": 0.5}}})
    assert cfg.resources.scorers.device == "cuda" and cfg.resources.renderers.device == "cpu"
    with pytest.raises(ConfigError, match="resources.policy"):
        load_config("quick", overrides={"resources": {"policy": {"num_gpus": 2}}})


def test_a_worker_group_shares_a_gpu_only_with_one_rank():
    """NCCL refuses two ranks of a group on one GPU; one rank may take a fraction (a one-GPU machine
    running every role at once, scripts/gpu_check.sh)."""
    cfg = load_config("quick", overrides={"resources": {"policy": {"num_workers": 1, "num_gpus": 0.4}}})
    assert cfg.resources.policy.num_gpus == 0.4 and cfg.resources.policy.device == "cuda"
    with pytest.raises(ConfigError, match="a fraction only with num_workers 1"):
        load_config("quick", overrides={"resources": {"policy": {"num_workers": 2, "num_gpus": 0.5}}})


def test_zero3_reference_needs_zero_stage_3():
    with pytest.raises(ConfigError, match="reference 'zero3' needs zero_stage 3"):
        load_config("quick", overrides={"policy": {"reference": "zero3", "zero_stage": 2}})


def test_config_show_prints_the_resolved_preset_and_its_gpu_plan(capsys):
    import yaml

    from caig_ray.jobs.cli import main

    assert main(["config", "show", "--preset", "gpu-cluster"]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    assert shown.pop("base") == "none"  # the whole resolved config: on the field defaults
    assert CaigConfig.model_validate(shown) == load_config("gpu-cluster")  # the plan is comments
    plan = [line.split() for line in out.splitlines() if line.startswith("# train ")]
    assert ["#", "train", "policy", "8", "cuda", "bfloat16", "8", "64"] in plan


def _write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text("base: quick\n" + text)
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


def test_the_procedural_renderer_paints_the_market_s_ad_geometry():
    """History ads (market.ad_image_size, market.product_fill) and the loop's procedural ads must be
    the same geometry; a diffusion renderer paints at its own size."""
    with pytest.raises(ConfigError, match=r"renderer.image_size/product_fill \(80, 0.78\) differ from "
                                          r"market.ad_image_size/product_fill \(64, 0.78\)"):
        load_config("quick", overrides={"renderer": {"image_size": 80}})
    with pytest.raises(ConfigError, match="product_fill"):
        load_config("quick", overrides={"market": {"product_fill": 0.6}})
    cfg = load_config("quick", overrides={"renderer": {"image_size": 80}, "market": {"ad_image_size": 80}})
    assert cfg.renderer.image_size == cfg.market.ad_image_size == 80
    assert load_config("gpu-cluster").renderer.image_size == 512  # diffusers: its own size


def test_a_backlog_sized_renderer_pool_needs_the_streaming_pipeline():
    """The sequential pipeline starts a Ray Data pool per round: there is no job-long pool for the
    driver to size, so the combination is refused, naming both keys."""
    cfg = load_config("quick", overrides={"resources": {"renderers": {"sizing": "backlog"}}})
    assert cfg.resources.renderers.sizing == "backlog" and cfg.resources.renderers.idle_release_s == 5.0
    with pytest.raises(ConfigError, match="resources.renderers.sizing backlog needs online.pipeline streaming"):
        load_config("quick", overrides={"resources": {"renderers": {"sizing": "backlog"}},
                                        "online": {"pipeline": "sequential"}})
    with pytest.raises(ConfigError, match="sizing"):
        load_config("quick", overrides={"resources": {"renderers": {"sizing": "fast"}}})


def test_resume_may_change_how_the_renderer_pool_is_sized_and_nothing_else_of_it(tmp_path):
    """Both sizings render the same pairs (tests/test_online_loop.py), so --resume may switch them; any
    other renderer-pool key still makes it another run."""
    from caig_ray.loop import check_same_run

    saved = load_config("quick")
    check_same_run(saved, load_config("quick", overrides={"resources": {"renderers": {"sizing": "backlog",
                                                                                     "idle_release_s": 60}}}), tmp_path)
    with pytest.raises(ConfigError, match=r"differs from the run's .*: resources.renderers;"):
        check_same_run(saved, load_config("quick", overrides={"resources": {"renderers": {"max_size": 4}}}), tmp_path)


def test_a_layer_on_a_block_its_base_does_not_set_keeps_the_block_s_defaults(tmp_path):
    """resources.renderers' default is max_size 2 and resources.policy's num_cpus 0.5 (ResourcesConfig),
    not their classes' own 1 and 1.0: a layer that sets one key of such a block, in a file or as
    flags, changes that key only."""
    base = load_config("quick").resources
    layer = {"resources": {"renderers": {"sizing": "backlog"}, "policy": {"num_workers": 1}}}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"base": "quick", **layer}))
    (tmp_path / "none.yaml").write_text(yaml.safe_dump({"base": "none", **layer}))
    for cfg in (load_config("quick", overrides=layer), load_config(tmp_path / "mine.yaml"),
                load_config(tmp_path / "none.yaml")):
        got = cfg.resources
        assert got.renderers.sizing == "backlog" and got.policy.num_workers == 1
        assert got.renderers.max_size == base.renderers.max_size == 2
        assert got.policy.num_cpus == base.policy.num_cpus == 0.5


def test_a_file_on_a_preset_that_is_itself_on_a_preset_gets_both_layers(tmp_path):
    """demo-no-attention is a layer on demo (its own ``base: demo``): a file on it is on both."""
    (tmp_path / "mine.yaml").write_text("base: demo-no-attention\nonline: {rounds: 1}\n")
    cfg, where = load_config_described(tmp_path / "mine.yaml")
    assert where == f"{tmp_path / 'mine.yaml'} on preset demo-no-attention on preset demo"
    want = load_config("demo-no-attention")
    assert cfg.online.rounds == 1
    assert cfg.model_dump(exclude={"online"}) == want.model_dump(exclude={"online"})
