"""The diffusers renderer's speed options timed side by side, plain first (the GPU check,
scripts/gpu_check.sh; deselected without --run-gpu). Goal on the card: <= 0.40 s/ad at batch 1 and
<= 0.20 s/ad at batch 8 (SD1.5 + ControlNet, 512 px, 30 Euler-a steps, CFG 7.5, fp16).

On cuda: the SD1.5-size random-weight UNet + ControlNet (``make_sd15_random``), batches 1, 4 and 8.
Per option (``VARIANTS``, one test each, so ``-k`` picks a part): s/ad after warm-up (two renders per
batch shape: compile compiles on the first, CUDA graphs record on the second), the pixel difference
from the plain pipeline's images (same prompts and seeds; generator_device draws other numbers on
cuda, so its images differ by design), and from torch.profiler the fraction of mid-loop denoising steps
the card spends in kernels, at the smallest and the largest batch. Timing every option compiles
three batch shapes per compiled option: minutes each on the card.

On cpu: the same code with the tiny hub SD at 64 px, 3 steps, batches 1 and 2; the compiled options
capture with torch.compile's "aot_eager" backend (the same full graphs run by eager kernels: inductor's
C++ code generation takes minutes on a CPU runner), and only "all" of the compiled ones (``CPU_VARIANTS``).
Results go under ``renderer_accel`` of the
``gpu_record``."""

import os
import statistics
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu

VARIANTS = {
    "plain": {},
    "channels_last": {"channels_last": True},
    "fuse_qkv": {"fuse_qkv": True},
    "generator_device": {"generator_device": "device"},
    "compile": {"compile": True},
    "compile_reduce_overhead": {"compile": True, "compile_mode": "reduce-overhead"},
    "all": {"channels_last": True, "fuse_qkv": True, "generator_device": "device", "compile": True,
            "compile_mode": "reduce-overhead"},
}
SETUP = {"cuda": dict(size=512, steps=30, batches=(1, 4, 8), dtype="float16", variant="fp16", repeats=2),
         "cpu": dict(size=64, steps=3, batches=(1, 2), dtype="float32", variant=None, repeats=1)}
PROMPTS = ["a bright stadium at night", "a pastel vanity, soft light", "a dark neon street", "a sunny beach"]
PLAIN_PIXELS: dict[int, np.ndarray] = {}  # batch -> the plain pipeline's images, for the differences
CPU_MAX_DIFF = 2  # tests/test_renderer_accel.py: float rounding flips a few uint8 values by 1


@pytest.fixture(scope="module")
def sd_folders(tmp_path_factory, hub_models, check_device):
    if check_device == "cuda":
        from caig_ray.testing.hub_families import make_sd15_random

        root = tmp_path_factory.mktemp("sd15_accel")
        return make_sd15_random(root / "sd", root / "cn")
    return hub_models["sd"], hub_models["controlnet"]


def _products(n: int) -> list[Image.Image]:
    imgs = []
    for k in range(n):
        img = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
        img.paste((40 * k % 255, 120, 200, 255), (64 + 4 * k, 48, 192, 208 - 4 * k))
        imgs.append(img)
    return imgs


def _render(renderer, batch: int):
    return renderer.render(_products(batch), [PROMPTS[k % len(PROMPTS)] for k in range(batch)], list(range(batch)))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def device_busy_fraction(renderer, batch: int, device: str) -> dict:
    """torch.profiler over a few mid-loop denoising steps of one render: the device's busy time (cuda:
    CUDA kernels and copies; cpu: the aten ops' own time) over the wall time of those steps, timed from
    a device sync at the end of the step before to one at the end of the last."""
    from torch.profiler import ProfilerActivity, profile, schedule

    n = renderer.cfg.steps
    wait = max(1, n // 3)
    active = max(1, min(5, n - 1 - wait))  # profiles denoising steps wait+1 .. wait+active
    scheduler = renderer.pipe.scheduler
    marks, done = [], []
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity], schedule=schedule(wait=wait, warmup=1, active=active, repeat=1)) as prof:
        def stepped(*args, _step=scheduler.step, **kwargs):
            out = _step(*args, **kwargs)
            if len(done) in (wait, wait + active):
                _sync(device)
                marks.append(time.perf_counter())
            done.append(1)
            prof.step()
            return out

        scheduler.step = stepped
        try:
            _render(renderer, batch)
        finally:
            del scheduler.step
    wall_us = 1e6 * (marks[1] - marks[0])
    if device == "cuda":
        busy_us = sum(e.time_range.elapsed_us() for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        busy_us = sum(e.self_cpu_time_total for e in prof.events() if e.name.startswith("aten::"))
    return {"steps_profiled": active, "step_wall_ms": round(wall_us / active / 1e3, 3),
            "busy_fraction": round(busy_us / wall_us, 3)}


# On CPU compile captures with aot_eager, which has no modes: "compile" and "compile_reduce_overhead" would
# capture exactly as "all" does, and the capture itself (whole graphs, the modes asked for, the same images)
# is tests/test_renderer_accel.py's test_compile_captures_unet_and_controlnet_whole. So on CPU they are not
# collected; on the card every variant runs side by side.
CPU_VARIANTS = [v for v in VARIANTS if v not in ("compile", "compile_reduce_overhead")]


@pytest.mark.parametrize("variant", list(VARIANTS) if os.environ.get("CAIG_GPU_CHECK_DEVICE", "cuda") != "cpu"
                         else CPU_VARIANTS)
def test_renderer_speed_option_side_by_side(variant, sd_folders, check_device, gpu_record, monkeypatch):
    from caig_ray.config import RendererConfig
    from caig_ray.models.renderer import make_renderer

    setup, options = SETUP[check_device], VARIANTS[variant]
    compile_backend = "inductor"
    if options.get("compile") and check_device == "cpu":
        # aot_eager has no modes: on cpu "all" captures as plain compile does
        compile_backend = "aot_eager"
        real_compile = torch.compile
        monkeypatch.setattr(torch, "compile", lambda model, mode, **kw: real_compile(model, backend="aot_eager", **kw))
    record = gpu_record.setdefault("renderer_accel", {
        "model": "SD1.5-size random weights (make_sd15_random)" if check_device == "cuda" else "tiny hub SD",
        "size": setup["size"], "steps": setup["steps"], "dtype": setup["dtype"], "scheduler": "euler_ancestral",
        "guidance_scale": 7.5, "timed_renders_per_batch": setup["repeats"], "variants": {}})
    torch._dynamo.reset()
    if check_device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sd, cn = sd_folders
    cfg = RendererConfig(kind="diffusers", sd_path=str(sd), controlnet_path=str(cn), variant=setup["variant"],
                         image_size=setup["size"], steps=setup["steps"], batch_size=max(setup["batches"]),
                         **options)
    t = time.perf_counter()
    renderer = make_renderer(cfg, check_device, setup["dtype"])
    row = {"options": options, "compile_backend": compile_backend if options.get("compile") else None,
           "load_s": round(time.perf_counter() - t, 2)}
    record["variants"][variant] = row  # filled in below, so that a failing check keeps what it measured
    for b in setup["batches"]:
        warm = []
        for _ in range(2):  # compile compiles this shape on the first; CUDA graphs record on the second
            _sync(check_device)
            t = time.perf_counter()
            _render(renderer, b)
            _sync(check_device)
            warm.append(round(time.perf_counter() - t, 2))
        times = []
        for _ in range(setup["repeats"]):
            t = time.perf_counter()
            ads = _render(renderer, b)
            _sync(check_device)
            times.append(time.perf_counter() - t)
        assert len(ads) == b and all(ad.image.size == (setup["size"],) * 2 for ad in ads)
        px = np.stack([np.asarray(ad.image, dtype=np.int16) for ad in ads])
        if variant == "plain":
            PLAIN_PIXELS[b] = px
        diff = np.abs(px - PLAIN_PIXELS[b]) if b in PLAIN_PIXELS else None
        row[f"batch{b}"] = {"s_per_ad": round(statistics.median(times) / b, 4), "warm_up_s": warm,
                            "max_abs_pixel_diff_vs_plain": None if diff is None else int(diff.max()),
                            "mean_abs_pixel_diff_vs_plain": None if diff is None else round(float(diff.mean()), 4)}
        if check_device == "cpu" and diff is not None:  # on cuda only recorded: fp16, random weights
            assert diff.max() <= CPU_MAX_DIFF, (variant, b, int(diff.max()))
    for b in (setup["batches"][0], setup["batches"][-1]):
        row[f"batch{b}"]["profile"] = device_busy_fraction(renderer, b, check_device)
    for b in (setup["batches"][0], setup["batches"][-1]):  # the profiler saw the device work
        assert row[f"batch{b}"]["profile"]["busy_fraction"] > 0, row[f"batch{b}"]["profile"]
    row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if check_device == "cuda" else None
    del renderer
    torch._dynamo.reset()
    plain = record["variants"].get("plain")
    if check_device == "cuda" and variant == "all" and plain:
        # CUDA graphs remove the launch-bound part of a batch-1 step: all options together must beat plain
        assert row["batch1"]["s_per_ad"] < plain["batch1"]["s_per_ad"], (row["batch1"], plain["batch1"])
