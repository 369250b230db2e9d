"""The GPU check (scripts/gpu_check.sh; deselected without --run-gpu). On one CUDA card: the core the Ray
actors wrap -- a DeepSpeed ZeRO-3 policy over NCCL for every family, the RM in bf16, the renderer in
fp16 -- then the whole real path under Ray: one online round of the ``gpu-cluster`` pipeline (a policy
rank, a renderer pool and a scorer pool sharing the GPU through fractional GPUs, pairs streamed through
Ray Data into a DPO+PCPO step) and Serve with a GPU replica answering real HTTP, and a 7B-size policy
step (LLaVA-NeXT-7B shapes, LoRA r=128, ZeRO-3, ~2,900-token sequences) with its generate throughput.

``scripts/gpu_check.sh --device cpu`` runs the same tests on CPU at tiny sizes (gloo, float32): CI runs
that, so a change that breaks the check fails CI, not the next GPU run. Everything measured goes into
the ``gpu_record`` (tests/conftest.py), written as bench/results/gpu_check.json with the card's name."""

import base64
import io
import json
import os
import socket
import time
import urllib.request

import pytest
import torch
from PIL import Image

from caig_ray.rows import PreferenceExample
from caig_ray.testing.hub_families import FAMILIES

pytestmark = pytest.mark.gpu


def _dtype(device: str) -> str:
    return "bfloat16" if device == "cuda" else "float32"


def _products(n, size=256):
    imgs = []
    for k in range(n):
        img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        img.paste((40 * k % 255, 120, 200, 255), (size // 4, size // 5, 3 * size // 4, 4 * size // 5))
        imgs.append(img)
    return imgs


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device):
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None


def _reset_peak(device):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _distributed(device):
    """This process as a one-rank group: NCCL on the card, gloo on CPU (the backend the actors pick)."""
    import importlib

    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29611", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_zero3_over_the_device_backend(hub_models, family, check_device, gpu_record):
    import deepspeed

    from caig_ray.ds import deepspeed_config, gathered_for_generation
    from caig_ray.models.policy import load_policy
    from caig_ray.policy_ops import as_image, generate_descriptions, preference_loss_on_rows, preference_rows

    device, dtype = check_device, _dtype(check_device)
    lr = 5e-3 if device == "cuda" else 1e-3  # float32 steps at 5e-3 overshoot on the same 4 examples (Qwen2-VL)
    _distributed(device)
    _reset_peak(device)
    model, processor = load_policy(hub_models[family], dtype, device)
    ref, _ = load_policy(hub_models[family], dtype, device)
    ref.eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=lr),
                                      config=deepspeed_config(3, dtype))
    images = [as_image(p) for p in _products(4)]
    ins = [f"Write a background for product {k}" for k in range(4)]
    t = time.perf_counter()
    with gathered_for_generation(engine, 3) as module:
        gen = generate_descriptions(module, processor, images, ins, 2, 1.0, 0, 16, device=device)
    gen_s = time.perf_counter() - t
    assert len(gen) == 4 and all(len(g["descriptions"]) == 2 for g in gen)
    examples = [PreferenceExample(pair_id=str(k), image=img, instruction=i, chosen="a bright stadium, vivid",
                                  rejected="dim kitchen", seed=k) for k, (img, i) in enumerate(zip(images, ins))]
    losses, step_s = [], []
    for _ in range(4):
        t = time.perf_counter()
        loss, _ = preference_loss_on_rows(engine, ref, processor, preference_rows(examples, None, 1.0), 0.5, 1.0, device)
        engine.backward(loss)
        engine.step()
        _sync(device)
        step_s.append(time.perf_counter() - t)
        losses.append(float(loss))
    with gathered_for_generation(engine, 3) as module:  # generation after training: hooks were restored
        generate_descriptions(module, processor, images[:2], ins[:2], 2, 1.0, 1, 8, device=device)
    assert losses[-1] < losses[0]
    gpu_record[f"policy_{family}"] = {"zero_stage": 3, "dtype": dtype, "generate_4x2_16tok_s": round(gen_s, 3),
                                      "dpo_pcpo_step_s": [round(s, 3) for s in step_s], "loss": losses,
                                      "peak_gpu_mb": _peak_mb(device)}


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_model_on_the_device(hub_models, family, check_device, gpu_record):
    from caig_ray.models.reward import load_reward_model
    from caig_ray.scoring import PairScorer, PairToScore

    device, dtype = check_device, _dtype(check_device)
    model, processor = load_reward_model(hub_models[family], dtype=dtype, device=device, from_backbone=True)
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    assert next(model.parameters()).device.type == device
    ads = [p.convert("RGB") for p in _products(4)]
    pairs = [PairToScore(ads[k], ads[(k + 1) % 4], "red sneakers") for k in range(4)]
    for layout in ("composite", "two_images"):
        t = time.perf_counter()
        res = PairScorer(model, processor, 112, 4, device, layout).score(pairs)
        assert all(0 <= p <= 1 for p in res["p_left_debiased"])
        gpu_record.setdefault(f"rm_{family}", {})[f"score_4_pairs_{layout}_s"] = round(time.perf_counter() - t, 3)


def test_renderer_fp16_variant_tiny(hub_models, check_device):
    """A folder holding only *.fp16.safetensors loads (``renderer.variant``); fp16 on the card, cast to
    float32 on CPU (CPU kernels for half convolutions are not what users run)."""
    from caig_ray.config import RendererConfig
    from caig_ray.models.renderer import make_renderer

    dtype = "float16" if check_device == "cuda" else "float32"
    cfg = RendererConfig(kind="diffusers", sd_path=str(hub_models["sd_fp16"]), variant="fp16", image_size=64,
                         controlnet_path=str(hub_models["controlnet_fp16"]), steps=4, batch_size=4)
    renderer = make_renderer(cfg, check_device, dtype)
    assert renderer.pipe.unet.dtype == getattr(torch, dtype) and renderer.pipe.device.type == check_device
    ads = renderer.render(_products(4), ["a sunny beach"] * 4, [1, 1, 2, 2])
    assert len(ads) == 4 and ads[0].image.size == (64, 64)


def test_renderer_sd15_size_random_weights_time(tmp_path, hub_models, check_device, gpu_record):
    """On the card: an SD1.5-size UNet + ControlNet (random weights) at 512 px, 30 Euler-a steps, CFG
    7.5 -- seconds per ad at batch 1 and 8 (the round-time model's number, docs/models.md). On CPU the
    tiny pipeline through the same calls."""
    from caig_ray.config import RendererConfig
    from caig_ray.testing.hub_families import make_sd15_random
    from caig_ray.models.renderer import make_renderer

    gpu = check_device == "cuda"
    t = time.perf_counter()
    if gpu:
        sd, cn = make_sd15_random(tmp_path / "sd", tmp_path / "cn")
        size, steps, variant, dtype = 512, 30, "fp16", "float16"
    else:
        sd, cn, size, steps, variant, dtype = hub_models["sd"], hub_models["controlnet"], 64, 4, None, "float32"
    build_s = time.perf_counter() - t
    _reset_peak(check_device)
    cfg = RendererConfig(kind="diffusers", sd_path=str(sd), controlnet_path=str(cn), variant=variant,
                         image_size=size, steps=steps, batch_size=8)
    renderer = make_renderer(cfg, check_device, dtype)
    renderer.render(_products(2), ["warm-up"] * 2, [0, 0])
    timings = {}
    for n in (1, 8):
        _sync(check_device)
        t = time.perf_counter()
        ads = renderer.render(_products(n), ["a bright stadium at night"] * n, list(range(n)))
        _sync(check_device)
        timings[n] = (time.perf_counter() - t) / n
        assert len(ads) == n and ads[0].image.size == (size, size)
    gpu_record["renderer_sd15_size" if gpu else "renderer_tiny"] = {
        "dtype": dtype, "size": size, "steps": steps, "scheduler": "euler_ancestral",
        "s_per_ad_batch1": round(timings[1], 3), "s_per_ad_batch8": round(timings[8], 3),
        "build_and_save_s": round(build_s, 1), "peak_gpu_mb": _peak_mb(check_device)}


# --- the 7B-size policy step ------------------------------------------------------------------------

def test_policy_7b_size_step(tmp_path, check_device, gpu_record):
    """LLaVA-NeXT with llava-v1.6-vicuna-7b's shapes and random weights (they cost the time and memory
    trained ones do), bf16, LoRA r=128, gradient checkpointing, micro-batch 2, ZeRO-3 on one rank, a
    672-px product (AnyRes: 4 tiles + the base view, ~2,900 tokens a sequence): the PolicyEngine the
    Ray actor holds takes two DPO+PCPO steps (time and peak memory), then generates 2 descriptions of
    77 tokens for 64 products (tokens/s, s per product). On CPU: the tiny shapes, 4 products."""
    from caig_ray.config import LoraConfig, PolicyConfig, WorkerGroupPlacement
    from caig_ray.testing.hub_families import make_llava_next
    from caig_ray.policy_engine import PolicyEngine
    from caig_ray.policy_ops import build_batch

    gpu = check_device == "cuda"
    dtype = _dtype(check_device)
    _distributed(check_device)
    size, image_px, n_products, max_new = ("7b", 672, 64, 77) if gpu else ("tiny", 112, 4, 8)
    t = time.perf_counter()
    path = make_llava_next(tmp_path / f"llava_{size}", size=size, device=check_device, dtype=dtype)
    build_s = time.perf_counter() - t
    _reset_peak(check_device)
    cfg = PolicyConfig(model_path=str(path), image_size=None, zero_stage=3, gradient_checkpointing=True,
                       micro_batch_size=2, lr=2e-5, max_new_tokens=max_new, generate_batch_size=8,
                       lora=LoraConfig(enabled=True, r=128, alpha=256), pcpo_weight=1.0)
    t = time.perf_counter()
    engine = PolicyEngine(str(path), cfg, WorkerGroupPlacement(num_workers=1, num_gpus=1 if gpu else 0, dtype=dtype))
    load_s = time.perf_counter() - t
    png = io.BytesIO()
    _products(1, image_px)[0].convert("RGB").save(png, format="PNG")
    examples = [PreferenceExample(pair_id=str(k), image=png.getvalue(),
                                  instruction=f"Write a background for product {k}: red sneakers",
                                  chosen="a bright stadium at night, vivid colours, clean composition",
                                  rejected="a dim kitchen counter", seed=k) for k in range(2)]
    tokens = build_batch(engine.processor, [Image.open(io.BytesIO(examples[0].image))],
                         [examples[0].instruction], [examples[0].chosen])["input_ids"].shape[1]
    step_s, losses = [], []
    for _ in range(2):
        _sync(check_device)
        t = time.perf_counter()
        m = engine.train_step(examples)
        _sync(check_device)
        step_s.append(round(time.perf_counter() - t, 3))
        losses.append(m["loss"])
    step_peak = _peak_mb(check_device)
    assert all(v == v for v in losses)  # finite steps through the whole path
    from caig_ray.rows import ProductPrompt

    products = [ProductPrompt(title=f"red sneakers {k}", attributes={}, image=png.getvalue()) for k in range(n_products)]
    _sync(check_device)
    t = time.perf_counter()
    out = engine.generate(products, 2, 1.0, 0)
    _sync(check_device)
    gen_s = time.perf_counter() - t
    assert len(out) == n_products and all(len(o["descriptions"]) == 2 for o in out)
    new_tokens = sum(len(ids) for o in out for ids in o["token_ids"])
    # under ZeRO-3 a parameter's own tensor is its (empty) partition: ds_numel is its full size
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in engine.engine.module.parameters() if p.requires_grad)
    gpu_record["policy_7b_size" if gpu else "policy_7b_path_tiny"] = {
        "model": f"llava_next {size} (hub_families.LLAVA_SIZES[{size!r}]), random weights", "dtype": dtype,
        "zero_stage": 3, "ranks": 1, "lora_r": 128, "gradient_checkpointing": True, "micro_batch_size": 2,
        "examples_per_step": len(examples), "sequences_per_forward": 3 * 2, "tokens_per_sequence": int(tokens),
        "image_px": image_px, "trainable_parameters": int(trainable), "build_and_save_s": round(build_s, 1),
        "load_s": round(load_s, 1), "dpo_pcpo_step_s": step_s, "loss": losses, "peak_gpu_mb_step": step_peak,
        "generate_products": n_products, "generate_samples": 2, "max_new_tokens": max_new,
        "generate_s": round(gen_s, 2), "generated_tokens": int(new_tokens),
        "generate_tokens_per_s": round(new_tokens / gen_s, 1), "generate_s_per_product": round(gen_s / n_products, 3),
        "peak_gpu_mb": _peak_mb(check_device)}
    del engine


# --- the real path under Ray ------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gpu_cluster_cfg(device, hub_models, world, storage, renderer):
    """The ``gpu-cluster`` preset with the tiny real-architecture models, shrunk to one round on one
    card: every role on the GPU at once, the pools and the policy rank sharing it by fractions."""
    from caig_ray.config import load_config

    gpu = device == "cuda"
    dtype = _dtype(device)

    def share(gpus, cpus):
        return {"num_gpus": gpus if gpu else 0.0, "num_cpus": cpus, "dtype": dtype}

    sd, cn, size, steps = renderer
    return load_config("gpu-cluster", overrides={
        "storage": str(storage),
        "policy": {"model_path": str(hub_models["llava_next"]), "max_new_tokens": 16, "generate_batch_size": 4,
                   "lr": 1e-3, "warmup_ratio": 0.0},
        "reward": {"backbone_path": str(hub_models["llava_next"]), "model_path": None, "pair_image_size": 112},
        "renderer": {"sd_path": str(sd), "controlnet_path": str(cn), "variant": "fp16" if gpu else None,
                     "image_size": size, "steps": steps, "batch_size": 4},
        "data": {"catalog": str(world.catalog), "click_logs": str(world.click_logs)},
        "train_rm": {"epochs": 1, "max_pairs": 8, "batch_size": 2, "warmup_ratio": 0.0},
        # tie_margin None: the random PM's two samples often render the same ad; every pair must train
        "online": {"rounds": 1, "products_per_round": 8, "eval_products": 4, "pairs_per_batch": 2,
                   "train_batch_size": 8, "scorer_batch_size": 4, "tie_margin": None, "seed": 3},
        "resources": {
            "policy": {"num_workers": 1, **share(0.4, 1 if gpu else 0.5)},
            "reward_training": {"num_workers": 1, **share(1, 1)},
            "pretraining": {"num_workers": 1, **share(1, 1)},
            "renderers": {"min_size": 1, "max_size": 2, "resources": {"renderer": 1}, **share(0.2, 1 if gpu else 0.25),
                          "dtype": "float16" if gpu else "float32"},
            "scorers": {"min_size": 1, "max_size": 1, **share(0.1, 1 if gpu else 0.25)},
            "serve": {"min_replicas": 1, "max_replicas": 1, **share(0.1, 1 if gpu else 0.25)},
            "driver_models": {**share(0, 1), "num_gpus": 0.0},
        }})


@pytest.fixture(scope="module")
def ray_on_the_device(check_device):
    """Ray on this machine: the card as one GPU, and two units of the ``renderer`` resource the
    cluster's renderer group carries (cluster/raycluster.yaml), so the gpu-cluster placements hold."""
    import ray

    gpu = check_device == "cuda"
    ray.init(address="local", num_cpus=min(os.cpu_count() or 2, 16) if gpu else 2, num_gpus=1 if gpu else 0,
             resources={"renderer": 2}, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def gpu_cluster_models(ray_on_the_device, check_device, hub_models, quick_world, tmp_path_factory):
    """(cfg, RM folder): the RM trained by ``train-rm`` (Ray Train, one rank on the card) on the quick
    world's logs, started from the random PM as CAIG starts it."""
    from caig_ray.jobs.train_rm import train_rm
    from caig_ray.testing.hub_families import make_sd15_random

    root = tmp_path_factory.mktemp("gpu_cluster")
    if check_device == "cuda":
        renderer = (*make_sd15_random(root / "sd15", root / "cn15"), 512, 30)
    else:
        renderer = (hub_models["sd"], hub_models["controlnet"], 64, 2)
    storage = root / "storage"  # every job's output lands under the storage (gpu-cluster: /storage)
    cfg = _gpu_cluster_cfg(check_device, hub_models, quick_world, storage, renderer)
    t = time.perf_counter()
    s = train_rm(cfg, quick_world.root, storage / "rm")
    return cfg, storage / "rm", {"train_rm_s": round(time.perf_counter() - t, 1), "train_rm_zero_stage": s["zero_stage"]}


def test_one_online_round_under_ray_on_the_device(gpu_cluster_models, hub_models, quick_world, check_device,
                                                  gpu_record):
    """One round of the gpu-cluster pipeline with Ray actors: the policy rank (ZeRO-3 over NCCL), the
    renderer and scorer pools on fractions of the same GPU, pairs streamed through Ray Data into the
    DPO+PCPO step; every planned pair trained or skipped, none lost."""
    from caig_ray.jobs.train import train

    cfg, rm, rm_info = gpu_cluster_models
    t = time.perf_counter()
    s = train(cfg, rm.parent / "run", str(hub_models["llava_next"]), str(rm), str(quick_world.catalog), progress=False)
    wall = time.perf_counter() - t
    assert s["rounds"] == 1 and s["pairs_lost"] == 0 and s["pairs_duplicated"] == 0
    assert s["pairs_trained"] + s["pairs_skipped"] == s["pairs_planned"] == 8 and s["steps"] >= 1
    assert s["pairs_trained"] > 0
    gpu_record["ray_online_round"] = {
        **rm_info, "round_wall_s": round(wall, 1), "online_wall_s": s["online_wall_s"],
        "pairs_planned": s["pairs_planned"], "pairs_trained": s["pairs_trained"], "pairs_lost": s["pairs_lost"],
        "pairs_skipped": s["pairs_skipped"], "steps": s["steps"], "renderer_pool_size_max": s["renderer_pool_size_max"],
        "render_busy_s": s["render_busy_s"], "train_s": s["train_s"],
        "placements": {k: v for k, v in cfg.resources.model_dump(mode="json").items()
                       if k in ("policy", "renderers", "scorers")},
        "renderer": {"size": cfg.renderer.image_size, "steps": cfg.renderer.steps}}


def test_serve_replica_on_the_device_answers_http(gpu_cluster_models, check_device, gpu_record):
    """``caig-ray serve``'s app with its replica on a fraction of the GPU answers a real request."""
    import ray
    from ray import serve

    from caig_ray.jobs.serve_rm import build_app

    cfg, rm, _ = gpu_cluster_models
    port = _free_port()
    gpus_free = ray.available_resources().get("GPU", 0.0)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        t = time.perf_counter()
        serve.run(build_app({"reward": {"model_path": str(rm)},
                             "resources": {"serve": cfg.resources.serve.model_dump(mode="json")}}),
                  name="rm-gpu-check", route_prefix="/")
        ready_s = time.perf_counter() - t

        def png_b64(color):
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), color).save(buf, format="PNG")
            return base64.b64encode(buf.getvalue()).decode()

        body = json.dumps({"product": {"title": "red sneakers"}, "image_a": png_b64((200, 20, 20)),
                           "image_b": png_b64((20, 20, 200))}).encode()
        latencies = []
        for _ in range(3):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/score", data=body,
                                         headers={"Content-Type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=120) as resp:
                out = json.loads(resp.read())
            latencies.append(round(time.perf_counter() - t, 3))
            assert 0 <= out["p_first_better_debiased"] <= 1
        # the one replica holds its fraction of the card (Serve's controller and proxy hold none)
        held = gpus_free - ray.available_resources().get("GPU", 0.0)
        assert held == pytest.approx(cfg.resources.serve.num_gpus, abs=1e-6), held
        gpu_record["serve_replica"] = {"num_gpus_held": round(held, 4), "ready_s": round(ready_s, 1),
                                       "score_latency_s": latencies, "ray": ray.__version__}
    finally:
        serve.shutdown()
