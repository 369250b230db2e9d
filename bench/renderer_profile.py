"""Where a diffusers render's time goes, on CPU: inside the UNet and ControlNet forwards, or host work.

    python bench/renderer_profile.py [--steps 30] [--repeats 3] [--threads 1] [--compile]

Two real-architecture models, both rendering 64 px ads from random weights:

- ``tiny``: the tests' hub SD (``make_sd_folders``: a 2-block UNet, the same pipeline classes);
- ``sd15_graph``: SD1.5's own block structure -- 4 UNet/ControlNet blocks, 2 layers each, 8 heads,
  a 12-layer CLIP, the 4-block VAE -- at narrow widths, so a step dispatches as many ops as SD1.5's
  while its arithmetic is tiny: its time per step is the host-side cost of SD1.5's graph.

For each, per denoising step (median over steps 1.. of every timed render; step 0 also finds the
scheduler's index): the time in the ControlNet and UNet forwards (module hooks), in the scheduler
(``step`` with its noise draw, ``scale_model_input``) and the rest (latent concatenations, CFG);
per render call: product placement and canny/mask prep, prompt encoding, image preprocessing, the
VAE, the tensor-to-PIL postprocessing and the paste-back. One render per model runs under
``torch.profiler``: the ops of a step inside and outside the forwards (counts and self time).
Then the speed options of ``RendererConfig`` side by side (s/ad and the pixel difference from
the plain pipeline); ``--compile`` adds torch.compile (inductor on CPU compiles for minutes here).

One thread (``--threads``): the ops are too small to split, and the machine is shared. Writes
bench/results/renderer_profile_cpu.json and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import caig_ray.models.renderer as renderer_module
from caig_ray.config import RendererConfig
from caig_ray.models.renderer import DiffusersRenderer

SIZE = 64
PROMPTS = ["a bright stadium at night", "a pastel vanity, soft light", "a dark neon street", "a sunny beach"]


def sd15_graph_folders(sd_dir: Path, cn_dir: Path) -> tuple[Path, Path]:
    """SD1.5's inpainting UNet, canny ControlNet, VAE and CLIP text encoder with SD1.5's block and layer
    counts (``make_sd15_random``'s configs) at about a tenth of the widths, saved as folders."""
    from diffusers import (
        AutoencoderKL, ControlNetModel, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from caig_ray.testing.hub_families import market_corpus
    from caig_ray.models.tokenizers import build_clip_tokenizer

    torch.manual_seed(0)
    blocks = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, cross_attention_dim=64,
                  attention_head_dim=8, norm_num_groups=8)
    down = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    unet = UNet2DConditionModel(sample_size=8, in_channels=9, out_channels=4, down_block_types=down,
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **blocks)
    controlnet = ControlNetModel(in_channels=4, down_block_types=down,
                                 conditioning_embedding_out_channels=(16, 32, 96, 256), **blocks)
    vae = AutoencoderKL(block_out_channels=(16, 32, 64, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=8, sample_size=SIZE)
    tokenizer = build_clip_tokenizer(market_corpus(), vocab_size=600)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4,
                                                num_hidden_layers=12, vocab_size=len(tokenizer),
                                                max_position_embeddings=77, projection_dim=64,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(sd_dir))
    controlnet.save_pretrained(str(cn_dir))
    return sd_dir, cn_dir


def products(n: int):
    from PIL import Image

    out = []
    for k in range(n):
        img = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
        img.paste((40 * k % 255, 120, 200, 255), (24, 16, 72, 84))
        out.append(img)
    return out


class Probe:
    """Wall-clock intervals of a renderer's pieces, from module hooks and wrapped methods of this
    renderer's own pipeline objects (the renderer module's helpers are wrapped while the probe is on)."""

    MODULES = ("controlnet", "unet", "text_encoder")
    PIPE_METHODS = ("encode_prompt", "prepare_control_image", "prepare_latents", "prepare_mask_latents")
    HELPERS = ("place_product", "control_and_mask", "clean_prompt", "paste_product")

    def __init__(self, renderer: DiffusersRenderer, profile_ranges: bool = False):
        self.events: list[tuple[str, float, float]] = []
        self.profile_ranges = profile_ranges  # also open a torch.profiler range per piece
        self.undo = []
        pipe = renderer.pipe
        for name in self.MODULES:
            self._hook_module(getattr(pipe, name), name)
        for name in self.PIPE_METHODS:
            self._wrap(pipe, name, name)
        self._wrap(pipe.image_processor, "preprocess", "image_preprocess")
        self._wrap(pipe.mask_processor, "preprocess", "mask_preprocess")
        self._wrap(pipe.image_processor, "postprocess", "postprocess_to_pil")
        self._wrap(pipe.vae, "decode", "vae_decode")
        self._wrap(pipe.scheduler, "step", "scheduler_step")
        self._wrap(pipe.scheduler, "scale_model_input", "scale_model_input")
        for name in self.HELPERS:
            self._wrap(renderer_module, name, name)

    def _range(self, name):
        return torch.profiler.record_function(name) if self.profile_ranges else None

    def _hook_module(self, module, name):
        open_ = []

        def pre(*_):
            r = self._range(name)
            if r is not None:
                r.__enter__()
            open_.append((time.perf_counter(), r))

        def post(*_):
            t0, r = open_.pop()
            if r is not None:
                r.__exit__(None, None, None)
            self.events.append((name, t0, time.perf_counter()))

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self.undo.append(lambda: [h.remove() for h in handles])

    def _wrap(self, owner, attr, name):
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            r = self._range(name)
            if r is not None:
                r.__enter__()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.events.append((name, t0, time.perf_counter()))
                if r is not None:
                    r.__exit__(None, None, None)

        had_own = attr in vars(owner)
        setattr(owner, attr, timed)
        self.undo.append(lambda: setattr(owner, attr, fn) if had_own else delattr(owner, attr))

    def remove(self):
        for u in reversed(self.undo):
            u()

    def steps(self) -> list[dict]:
        """Per denoising step after the first: the step's wall time (from the previous scheduler step's
        end to this one's) and the time of each piece that started inside it."""
        ends = [e for e in self.events if e[0] == "scheduler_step"]
        out = []
        for prev, cur in zip(ends, ends[1:]):
            lo, hi = prev[2], cur[2]
            if hi - lo <= 0 or any(e[0] == "postprocess_to_pil" and lo <= e[1] < hi for e in self.events):
                continue  # the first step of the next render call
            parts = defaultdict(float)
            for name, t0, t1 in self.events:
                if lo <= t0 < hi and name in ("controlnet", "unet", "scheduler_step", "scale_model_input"):
                    parts[name] += t1 - t0
            wall = hi - lo
            out.append({"wall": wall, **parts, "other": wall - sum(parts.values())})
        return out

    def phases(self) -> dict[str, float]:
        totals = defaultdict(float)
        for name, t0, t1 in self.events:
            if name not in ("controlnet", "unet", "scheduler_step", "scale_model_input", "text_encoder"):
                totals[name] += t1 - t0
        return totals


def mean_parts(steps: list[dict]) -> dict[str, float]:
    """Mean per step of each part (means, so the parts add up to the wall time)."""
    keys = ("wall", "controlnet", "unet", "scheduler_step", "scale_model_input", "other")
    return {k: statistics.mean(s.get(k, 0.0) for s in steps) for k in keys}


def render(r: DiffusersRenderer, batch: int, seed0: int = 0):
    return r.render(products(batch), [PROMPTS[k % len(PROMPTS)] for k in range(batch)],
                    list(range(seed0, seed0 + batch)))


def pixels(ads) -> np.ndarray:
    return np.stack([np.asarray(a.image, dtype=np.int16) for a in ads])


def hook_timing(r: DiffusersRenderer, batch: int, repeats: int) -> dict:
    render(r, batch)  # warm-up
    probe = Probe(r)
    calls = []
    for k in range(repeats):
        t = time.perf_counter()
        render(r, batch, seed0=k)
        calls.append(time.perf_counter() - t)
        probe.events.append(("render", t, t + calls[-1]))
    steps = probe.steps()
    probe.remove()
    mean = mean_parts(steps)
    model = mean["controlnet"] + mean["unet"]
    phases = {k: v / repeats for k, v in probe.phases().items() if k != "render"}
    # step 0: from the mask latents (the last preparation) to its scheduler step; it also finds the
    # scheduler's step index (a device sync on CUDA)
    ends = [e for e in probe.events if e[0] == "scheduler_step"]
    starts = [e for e in probe.events if e[0] == "prepare_mask_latents"]
    first = statistics.mean(min(e[2] for e in ends if e[2] > s[2]) - s[2] for s in starts)
    render_s = statistics.median(calls)
    loop = sum(s["wall"] for s in steps) / repeats  # steps 1.. of a call
    return {
        "render_s_median": render_s, "s_per_ad": render_s / batch, "render_s_all": calls,
        "step_ms_mean": {k: 1e3 * v for k, v in mean.items()},
        "step_ms_median_wall": 1e3 * statistics.median(s["wall"] for s in steps),
        "step_share_in_model_forwards": model / mean["wall"],
        "step_host_ms_outside_forwards": 1e3 * (mean["wall"] - model),
        "call_ms_mean": {**{k: 1e3 * v for k, v in sorted(phases.items())},
                         "denoising_step_0": 1e3 * first, "denoising_steps_after_first": 1e3 * loop,
                         "rest_of_call": 1e3 * (statistics.mean(calls) - first - loop - sum(phases.values()))},
    }


def profiled_ops(r: DiffusersRenderer, batch: int) -> dict:
    """One render under torch.profiler: per step after the first, the aten ops dispatched inside the
    ControlNet and UNet forwards and outside them (count, self CPU µs), the outside ones by name."""
    from torch.profiler import ProfilerActivity, profile

    probe = Probe(r, profile_ranges=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        render(r, batch, seed0=100)
    probe.remove()
    events = prof.events()
    sched = sorted((e for e in events if e.name == "scheduler_step"), key=lambda e: e.time_range.start)
    lo, hi = sched[0].time_range.end, sched[-1].time_range.end  # steps 1..N-1
    n_steps = len(sched) - 1

    def owner(e):
        p = e.cpu_parent
        while p is not None:
            if p.name in ("controlnet", "unet", "scheduler_step", "scale_model_input"):
                return p.name
            p = p.cpu_parent
        return "other"

    count, self_us = defaultdict(int), defaultdict(float)
    outside = defaultdict(lambda: [0, 0.0])
    for e in events:
        if not e.name.startswith("aten::") or not lo <= e.time_range.start < hi:
            continue
        who = owner(e)
        top = e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")
        if top:  # an op the framework dispatched (on CUDA: at least one launch)
            count[who] += 1
        self_us[who] += e.self_cpu_time_total
        if who not in ("controlnet", "unet"):
            outside[e.name][0] += int(top)
            outside[e.name][1] += e.self_cpu_time_total
    per_step = lambda d: {k: round(v / n_steps, 1) for k, v in d.items()}  # noqa: E731
    top_outside = sorted(outside.items(), key=lambda kv: -kv[1][1])[:12]
    return {"steps_profiled": n_steps, "top_level_ops_per_step": per_step(count),
            "op_self_cpu_us_per_step": per_step(self_us),
            "outside_forwards_by_op_per_step": {k: {"top_level_count": round(c / n_steps, 2),
                                                    "self_cpu_us": round(us / n_steps, 1)}
                                                for k, (c, us) in top_outside}}


def options(base: dict, batch_sizes: list[int], repeats: int, with_compile: bool) -> dict:
    variants = {"plain": {}, "channels_last": {"channels_last": True}, "fuse_qkv": {"fuse_qkv": True},
                "generator_device": {"generator_device": "device"},
                "all_but_compile": {"channels_last": True, "fuse_qkv": True, "generator_device": "device"}}
    if with_compile:
        variants["compile"] = {"compile": True}
    out, ref = {}, {}
    for name, opts in variants.items():
        r = DiffusersRenderer(RendererConfig(**base, **opts))
        row = {}
        for b in batch_sizes:
            t = time.perf_counter()
            render(r, b)  # warm-up (compiles with compile)
            first = time.perf_counter() - t
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                ads = render(r, b)
                times.append(time.perf_counter() - t)
            px = pixels(ads)
            ref.setdefault(b, px)
            diff = np.abs(px - ref[b])
            row[f"batch{b}"] = {"s_per_ad": statistics.median(times) / b, "first_call_s": first,
                                "max_abs_pixel_diff_vs_plain": int(diff.max()),
                                "mean_abs_pixel_diff_vs_plain": float(diff.mean())}
        out[name] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--option-repeats", type=int, default=1, help="timed renders per speed option, after a warm-up")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (inductor: minutes on CPU)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "renderer_profile_cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True).stdout.strip())
    import diffusers

    from caig_ray.testing.hub_families import make_sd_folders

    result = {"command": " ".join(["python", "bench/renderer_profile.py", *sys.argv[1:]]),
              "code": commit + (" + uncommitted changes" if dirty else ""),
              "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                        f"{args.threads} torch thread(s))",
              "load_average_at_start": os.getloadavg(), "torch": torch.__version__,
              "diffusers": diffusers.__version__, "image_size": SIZE, "steps": args.steps,
              "scheduler": "euler_ancestral", "guidance_scale": 7.5, "repeats": args.repeats,
              "option_repeats": args.option_repeats, "models": {}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {"tiny": make_sd_folders(tmp / "tiny_sd", tmp / "tiny_cn"),
                   "sd15_graph": sd15_graph_folders(tmp / "g_sd", tmp / "g_cn")}
        for name, (sd, cn) in folders.items():
            base = dict(kind="diffusers", sd_path=str(sd), controlnet_path=str(cn), image_size=SIZE,
                        steps=args.steps, batch_size=max(batches))
            r = DiffusersRenderer(RendererConfig(**base))
            n_params = {m: sum(x.numel() for x in getattr(r.pipe, m).parameters())
                        for m in ("unet", "controlnet", "vae", "text_encoder")}
            model = {"params": n_params, "by_batch": {}}
            for b in batches:
                model["by_batch"][f"batch{b}"] = {**hook_timing(r, b, args.repeats), "profiler": profiled_ops(r, b)}
            model["options"] = options(base, batches, args.option_repeats, args.compile)
            result["models"][name] = model
    result["load_average_at_end"] = os.getloadavg()
    result["bench_wall_s"] = time.perf_counter() - t_all
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))

    print(result["command"], "->", args.out)
    print(f"{'model':<11} {'batch':>5} {'s/ad':>7} {'step ms':>8} {'CN ms':>6} {'UNet ms':>7} {'sched ms':>8} "
          f"{'other ms':>8} {'in fwd':>6} {'ops/step':>8}")
    for name, m in result["models"].items():
        for b, row in m["by_batch"].items():
            s, ops = row["step_ms_mean"], row["profiler"]["top_level_ops_per_step"]
            print(f"{name:<11} {b[5:]:>5} {row['s_per_ad']:7.3f} {s['wall']:8.2f} {s['controlnet']:6.2f} "
                  f"{s['unet']:7.2f} {s['scheduler_step'] + s['scale_model_input']:8.2f} {s['other']:8.2f} "
                  f"{row['step_share_in_model_forwards']:6.1%} {sum(ops.values()):8.0f}")
    print(f"{'model':<11} {'option':<17} " + " ".join(f"{'s/ad b' + str(b):>9} {'maxdiff':>7}" for b in batches))
    for name, m in result["models"].items():
        for opt, row in m["options"].items():
            print(f"{name:<11} {opt:<17} " + " ".join(
                f"{row[f'batch{b}']['s_per_ad']:9.3f} {row[f'batch{b}']['max_abs_pixel_diff_vs_plain']:7d}"
                for b in batches))


if __name__ == "__main__":
    main()
