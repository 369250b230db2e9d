"""The real-architecture tiny models on CUDA (run by scripts/gpu_check.sh with --run-gpu; deselected
elsewhere). No Ray on the GPU machine (its wheel does not travel), so this checks the core the Ray
actors wrap: a DeepSpeed ZeRO-3 policy over NCCL (gathered generation + DPO/PCPO steps) for every
family, the RM in bf16, the renderer in fp16 -- tiny, and SD1.5-size with random weights for time.
Every test records what it measured into bench/results/gpu_check.json (CAIG_GPU_CHECK_OUT)."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from caig_ray.models.hub_families import FAMILIES

pytestmark = pytest.mark.gpu
RESULTS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def report():
    RESULTS.update(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                   cuda=torch.version.cuda, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    yield
    out = Path(os.environ.get("CAIG_GPU_CHECK_OUT", Path(__file__).parents[1] / "bench" / "results" / "gpu_check.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=1))


def _products(n):
    imgs = []
    for k in range(n):
        img = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
        img.paste((40 * k % 255, 120, 200, 255), (64, 48, 192, 208))
        imgs.append(img)
    return imgs


def _nccl():
    import importlib

    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29611", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="nccl")


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_zero3_bf16_over_nccl(hub_models, family):
    import deepspeed

    from caig_ray.ds import deepspeed_config, gathered_for_generation
    from caig_ray.models.policy import load_policy
    from caig_ray.policy_ops import as_image, dpo_pcpo_step_loss, generate_descriptions

    _nccl()
    torch.cuda.reset_peak_memory_stats()
    model, processor = load_policy(hub_models[family], "bfloat16")
    ref, _ = load_policy(hub_models[family], "bfloat16", "cuda")
    ref.eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=5e-3),
                                      config=deepspeed_config(3, "bfloat16"))
    images = [as_image(p) for p in _products(4)]
    ins = [f"Write a background for product {k}" for k in range(4)]
    t = time.perf_counter()
    with gathered_for_generation(engine, 3) as module:
        gen = generate_descriptions(module, processor, images, ins, 2, 1.0, 0, 16, device="cuda")
    gen_s = time.perf_counter() - t
    assert len(gen) == 4 and all(len(g["descriptions"]) == 2 for g in gen)
    examples = [{"image": img, "instruction": i, "chosen": "a bright stadium, vivid", "rejected": "dim kitchen",
                 "seed": k} for k, (img, i) in enumerate(zip(images, ins))]
    losses, step_s = [], []
    for _ in range(4):
        t = time.perf_counter()
        loss, _ = dpo_pcpo_step_loss(engine, ref, processor, examples, 0.5, 1.0, None, "cuda")
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t)
        losses.append(float(loss))
    with gathered_for_generation(engine, 3) as module:  # generation after training: hooks were restored
        generate_descriptions(module, processor, images[:2], ins[:2], 2, 1.0, 1, 8, device="cuda")
    assert losses[-1] < losses[0]
    RESULTS[f"policy_{family}"] = {"zero_stage": 3, "dtype": "bfloat16", "generate_4x2_16tok_s": round(gen_s, 3),
                                   "dpo_pcpo_step_s": [round(s, 3) for s in step_s], "loss": losses,
                                   "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_model_bf16_on_cuda(hub_models, family):
    from caig_ray.models.reward import load_reward_model
    from caig_ray.scoring import PairScorer, PairToScore

    model, processor = load_reward_model(hub_models[family], dtype="bfloat16", device="cuda", from_backbone=True)
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).is_cuda
    ads = [p.convert("RGB") for p in _products(4)]
    pairs = [PairToScore(ads[k], ads[(k + 1) % 4], "red sneakers") for k in range(4)]
    for layout in ("composite", "two_images"):
        t = time.perf_counter()
        res = PairScorer(model, processor, 112, 4, "cuda", layout).score(pairs)
        assert all(0 <= p <= 1 for p in res["p_left_debiased"])
        RESULTS.setdefault(f"rm_{family}", {})[f"score_4_pairs_{layout}_s"] = round(time.perf_counter() - t, 3)


def test_renderer_fp16_variant_tiny(hub_models):
    from caig_ray.config import RendererConfig
    from caig_ray.models.renderer import make_renderer

    cfg = RendererConfig(kind="diffusers", sd_path=str(hub_models["sd_fp16"]), variant="fp16", image_size=64,
                         controlnet_path=str(hub_models["controlnet_fp16"]), steps=4, batch_size=4)
    renderer = make_renderer(cfg, "cuda", "float16")
    assert renderer.pipe.unet.dtype == torch.float16 and renderer.pipe.device.type == "cuda"
    ads = renderer.render(_products(4), ["a sunny beach"] * 4, [1, 1, 2, 2])
    assert len(ads) == 4 and ads[0].image.size == (64, 64)


def test_renderer_sd15_size_random_weights_time(tmp_path):
    """SD1.5-size UNet + ControlNet (random weights) at 512 px, 30 Euler-a steps, CFG 7.5: seconds
    per ad at batch 8 ads -- the number the round-time model (docs/models.md, GPU check) needs."""
    from caig_ray.config import RendererConfig
    from caig_ray.models.hub_families import make_sd15_random
    from caig_ray.models.renderer import make_renderer

    t = time.perf_counter()
    make_sd15_random(tmp_path / "sd", tmp_path / "cn")
    build_s = time.perf_counter() - t
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = RendererConfig(kind="diffusers", sd_path=str(tmp_path / "sd"), controlnet_path=str(tmp_path / "cn"),
                         variant="fp16", image_size=512, steps=30, batch_size=8)
    renderer = make_renderer(cfg, "cuda", "float16")
    renderer.render(_products(2), ["warm-up"] * 2, [0, 0])
    timings = {}
    for n in (1, 8):
        torch.cuda.synchronize()
        t = time.perf_counter()
        ads = renderer.render(_products(n), ["a bright stadium at night"] * n, list(range(n)))
        torch.cuda.synchronize()
        timings[n] = (time.perf_counter() - t) / n
        assert len(ads) == n and ads[0].image.size == (512, 512)
    RESULTS["renderer_sd15_size"] = {"dtype": "float16", "size": 512, "steps": 30, "scheduler": "euler_ancestral",
                                     "s_per_ad_batch1": round(timings[1], 3), "s_per_ad_batch8": round(timings[8], 3),
                                     "build_and_save_s": round(build_s, 1),
                                     "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
