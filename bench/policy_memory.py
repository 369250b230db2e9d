"""Peak memory of one policy rank under the gpu-cluster settings, measured, and a 7B's from
DeepSpeed's own estimators (issue 12; docs/models.md, memory per GPU).

    python bench/policy_memory.py                 # on a CUDA machine (bf16, NCCL, 1 rank)
    python bench/policy_memory.py --device cpu --examples 2 4 --images 336   # a CPU smoke run

Model: LLaVA-NeXT of the real architecture at "mid" size (~70M parameters; the real CLIP-336 anyres
input, so a 512 px product is ~2,970 tokens, and the real 32,064-token vocabulary), random weights,
hub layout (caig_ray/testing/hub_families.py). Each configuration runs in its own process: a
PolicyEngine (the same class every Ray PolicyWorker holds) with ZeRO-3, gradient checkpointing,
selective log-softmax and the ZeRO-3 reference engine, one warm-up step, then one measured DPO+PCPO
step; peak = torch.cuda.max_memory_allocated over the measured step (CPU: the process's peak RSS).
Writes bench/results/policy_memory.json, with peak_ratio_max_over_min_examples: the largest over the
smallest peak across 8/32/128 examples per step at micro-batch 2 (flat = micro-batching works).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# LLaVA-v1.6-Vicuna-7B (public sizes): total parameters, the largest layer (embed_tokens 32064 x 4096),
# and the linear layers LoRA targets in each of its 32 decoder layers (in, out)
LLAVA_7B = {"total_params": 7_063_427_072, "largest_layer_params": 32064 * 4096, "layers": 32,
            "lora_linears": [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]}


def one_config(spec: dict) -> dict:
    """Build a PolicyEngine for ``spec`` and measure one DPO+PCPO step (run in a fresh process)."""
    import importlib

    import deepspeed
    import torch
    from PIL import Image

    from caig_ray.config import load_config
    from caig_ray.imaging import png_bytes
    from caig_ray.policy_engine import PolicyEngine
    from caig_ray.rows import PreferenceExample

    cuda = spec["device"] == "cuda"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if not cuda:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    full = load_config("gpu-cluster", overrides={
        "policy": {"model_path": spec["model"], "micro_batch_size": spec["micro_batch_size"],
                   "image_size": spec["image_size"]},
        "resources": {"policy": {"num_workers": 1, "num_gpus": 1 if cuda else 0,
                                 "dtype": "bfloat16" if cuda else "float32"}}})
    engine = PolicyEngine(spec["model"], full.policy, full.resources.policy)

    def product(k):
        im = Image.new("RGBA", (512, 512), (0, 0, 0, 0))
        im.paste((37 * k % 256, 120, 200, 255), (96, 64, 416, 448))
        return png_bytes(im)

    examples = [PreferenceExample(pair_id=str(k), image=product(k),
                                  instruction=f"Design a concise Stable Diffusion prompt for product {k}",
                                  chosen="a bright stadium at night, vivid colors, dramatic light",
                                  rejected="a dim kitchen, busy, dark", seed=k) for k in range(spec["examples"])]
    engine.train_step(examples[:2])  # warm-up: allocator, kernels, optimizer states exist from here on
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        metrics = engine.train_step(examples)
        status = "ok"
    except torch.OutOfMemoryError:
        metrics, status = {}, "out_of_memory"
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**spec, "status": status, "step_s": round(time.perf_counter() - t, 2), "peak_mb": round(peak / 2**20, 1),
            "n_micro_batches": metrics.get("n_micro_batches"), "loss": metrics.get("loss")}


def tokens_per_sequence(model_dir: str, image_size: int | None) -> int:
    from PIL import Image

    from caig_ray.models.policy import load_policy
    from caig_ray.policy_ops import as_image, build_batch

    _, processor = load_policy(model_dir)
    img = as_image(Image.new("RGB", (512, 512)), image_size)
    return int(build_batch(processor, [img], ["Design a concise Stable Diffusion prompt for product 0"],
                           ["a bright stadium at night, vivid colors, dramatic light"])["input_ids"].shape[1])


def estimates_7b(gpus: int = 8) -> dict:
    """DeepSpeed's own estimators (model states per GPU, no offload) for LLaVA-v1.6-Vicuna-7B on
    ``gpus`` GPUs, full fine-tune and LoRA r=128 (LoRA: the estimator on the trainable adapter +
    the frozen 16-bit base, partitioned under ZeRO-3, whole under ZeRO-2)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n, big = LLAVA_7B["total_params"], LLAVA_7B["largest_layer_params"]
    lora = LLAVA_7B["layers"] * sum(128 * (i + o) for i, o in LLAVA_7B["lora_linears"])
    gb = lambda b: round(b / 1e9, 2)  # noqa: E731
    z3 = estimate_zero3_model_states_mem_needs(n, big, gpus, 1, cpu_offload=False)[1]
    z2 = estimate_zero2_model_states_mem_needs(n, gpus, 1, cpu_offload=False)[1]
    z3_lora = estimate_zero3_model_states_mem_needs(lora, big, gpus, 1, cpu_offload=False)[1] + 2 * n // gpus
    z2_lora = estimate_zero2_model_states_mem_needs(lora, gpus, 1, cpu_offload=False)[1] + 2 * n
    return {"model": "llava-v1.6-vicuna-7b", "gpus": gpus, "total_params": n, "lora_r128_params": lora,
            "model_states_gb": {"zero3_full": gb(z3), "zero2_full": gb(z2), "zero3_lora": gb(z3_lora),
                                "zero2_lora": gb(z2_lora)},
            "reference_gb": {"replicated_bf16": gb(2 * n), "zero3_engine": gb(2 * n // gpus), "lora_adapter_off": 0.0},
            "zero3_generate_gathered_bf16_gb": gb(2 * n)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--examples", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--images", type=int, nargs="+", default=[336, 512], help="product image sides (sequence length)")
    p.add_argument("--whole-shard", type=int, nargs="*", default=[8, 32], help="examples run without micro-batches")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "policy_memory.json"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_config(json.loads(args.one))), flush=True)
        return 0
    from caig_ray.testing.hub_families import make_llava_next

    work = Path(tempfile.mkdtemp(prefix="policy_memory_"))
    model = str(make_llava_next(work / "llava_mid", size="mid"))
    specs = [dict(examples=n, micro_batch_size=2, image_size=512) for n in args.examples]
    specs += [dict(examples=8, micro_batch_size=2, image_size=s) for s in args.images if s != 512]
    specs += [dict(examples=n, micro_batch_size=None, image_size=512) for n in args.whole_shard]
    runs = []
    for k, spec in enumerate(specs):
        spec.update(model=model, device=args.device, port=29800 + k)
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)})
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        run = json.loads(line[0][7:]) if line else {**spec, "status": f"failed (exit {proc.returncode})",
                                                   "error": proc.stderr[-800:]}
        run["tokens_per_sequence"] = tokens_per_sequence(model, spec["image_size"])
        runs.append(run)
        print(f"examples {spec['examples']:>4} micro {spec['micro_batch_size']} image {spec['image_size']}: "
              f"{run['status']}, peak {run.get('peak_mb')} MB, {run.get('step_s')} s", flush=True)
    flat = [r["peak_mb"] for r in runs if r["micro_batch_size"] == 2 and r["image_size"] == 512 and r["status"] == "ok"]
    import torch

    result = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "model": "llava_next mid (hub_families.LLAVA_SIZES['mid'])",
              "params_m": 69.7, "settings": "ZeRO-3, bf16, gradient checkpointing, selective log-softmax, "
                                            "reference = ZeRO-3 engine, 1 rank",
              "runs": runs,
              "peak_ratio_max_over_min_examples": round(max(flat) / min(flat), 3) if len(flat) > 1 else None,
              "estimates_7b_8x80gb": estimates_7b(8)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"peak ratio (max/min over {args.examples} examples at micro-batch 2): "
          f"{result['peak_ratio_max_over_min_examples']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
