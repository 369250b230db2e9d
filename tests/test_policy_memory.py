"""The 7B-memory path of the policy, checked as equalities (issue 12): micro-batching with gradient
accumulation equals one forward over the shard (loss, metrics, updated weights), for ZeRO-2 and
ZeRO-3; selective log-softmax equals the full-vocabulary one; under ZeRO-3 a LoRA adapter is saved
consolidated (not the empty partitions) and loads back, merged or as an adapter, to the same policy.
``PolicyEngine`` (what each Ray PolicyWorker holds) runs in a subprocess (DeepSpeed, world size 1, gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from caig_ray.testing.hub_families import FAMILIES

WORKER_SCRIPT = r'''
import json, os, sys, torch
import deepspeed
from PIL import Image
from caig_ray.config import load_config
from caig_ray.imaging import png_bytes
from caig_ray.policy_engine import PolicyEngine
from caig_ray.rows import PreferenceExample
path, stage, port, out, lora = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "lora"
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
from caig_ray.ds import init_distributed
init_distributed(use_gpu=False)  # gloo, DeepSpeed's shm op not built

def product(k):
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    im.paste((40 * k, 120, 200, 255), (16, 12, 48, 52))
    return png_bytes(im)

examples = [PreferenceExample(pair_id=str(k), image=product(k),
                              instruction="Write a background for product %d %s" % (k, "x " * k),
                              chosen="a bright stadium, vivid" + " neon" * k, rejected="dim kitchen", seed=k)
            for k in range(5)]
result = {}
for mb in ([None] if lora else [None, 1, 2]):
    over = {"policy": {"zero_stage": stage, "lr": 1e-3, "micro_batch_size": mb, "gradient_checkpointing": mb == 1,
                       "lora": {"enabled": lora, "r": 4, "alpha": 8}}}
    full = load_config("quick", overrides=over)
    worker = PolicyEngine(path, full.policy, full.resources.policy, 0, 10)
    steps = [worker.train_step(examples) for _ in range(2)]
    torch.save({k: v.float() for k, v in worker._consolidated_state().items()}, out + ".%s.pt" % mb)
    result[str(mb)] = {"steps": steps, "logps": worker.logps(examples)}
    if lora:
        worker.save(out + ".ckpt")
        worker.save_model(out + ".merged")
json.dump(result, open(out, "w"))
'''


def _run_worker(model_dir, stage, tmp_path, lora=False, port=29750):
    out = tmp_path / f"z{stage}{'lora' if lora else ''}.json"
    root = Path(__file__).parents[1]
    proc = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, str(model_dir), str(stage), str(port + stage),
                           str(out), "lora" if lora else "full"], capture_output=True, text=True, timeout=500,
                          cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [2, 3])
def test_micro_batches_equal_one_forward_over_the_shard(hub_models, tmp_path, stage):
    """5 examples: micro-batch 1 (5 forwards, gradient checkpointing on), 2 (3 forwards) and the whole
    shard (1 forward): the same loss and metrics at both steps and the same weights after them."""
    out, result = _run_worker(hub_models["llava_next"], stage, tmp_path)
    whole = result["None"]
    assert [s["n_micro_batches"] for s in whole["steps"]] == [1, 1]
    assert whole["steps"][1]["loss"] != pytest.approx(whole["steps"][0]["loss"], abs=1e-3)  # it trained
    ref_w = torch.load(f"{out}.None.pt")
    for mb, forwards in (("1", 5), ("2", 3)):
        steps = result[mb]["steps"]
        assert [s["n_micro_batches"] for s in steps] == [forwards, forwards]
        for got, want in zip(steps, whole["steps"]):
            for key in set(want) - {"n_micro_batches"}:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (mb, key)
        weights = torch.load(f"{out}.{mb}.pt")
        assert weights.keys() == ref_w.keys()
        assert max(float((weights[k] - ref_w[k]).abs().max()) for k in ref_w) < 2e-5
        assert result[mb]["logps"] == pytest.approx(whole["logps"], abs=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_lora_adapter_is_saved_consolidated_and_loads_back(hub_models, tmp_path):
    from peft import PeftModel

    from caig_ray.models.policy import load_policy
    from caig_ray.imaging import png_bytes
    from caig_ray.policy_ops import as_image, build_batch, response_logps

    out, result = _run_worker(hub_models["llava_next"], 3, tmp_path, lora=True)
    trained = result["None"]["logps"]
    base, processor = load_policy(hub_models["llava_next"])
    adapter = PeftModel.from_pretrained(base, f"{out}.ckpt/adapter").eval()
    merged, _ = load_policy(f"{out}.merged")

    def product(k):
        im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        im.paste((40 * k, 120, 200, 255), (16, 12, 48, 52))
        return as_image(png_bytes(im), 56)

    batch = build_batch(processor, [product(k) for k in range(5)],
                        ["Write a background for product %d %s" % (k, "x " * k) for k in range(5)],
                        ["a bright stadium, vivid" + " neon" * k for k in range(5)])
    with torch.no_grad():
        from_adapter = response_logps(adapter, batch).tolist()
        from_merged = response_logps(merged.eval(), batch).tolist()
        untrained = response_logps(load_policy(hub_models["llava_next"])[0].eval(), batch).tolist()
    assert from_adapter == pytest.approx(trained, abs=1e-3)
    assert from_merged == pytest.approx(trained, abs=1e-3)
    assert untrained != pytest.approx(trained, abs=1e-3)  # the adapter moved the policy


@pytest.mark.parametrize("family", FAMILIES)
def test_selective_log_softmax_equals_the_full_vocabulary_one(hub_models, family):
    from caig_ray.models.policy import load_policy
    from caig_ray.policy_ops import build_batch, full_response_logps, left_padded, response_logps

    model, processor = load_policy(hub_models[family])
    images = [Image.new("RGB", (96, 96), (200, 10, 10)), Image.new("RGB", (60, 90), (0, 100, 10))]
    for side in ("left", "right"):
        processor.tokenizer.padding_side = side
        batch = build_batch(processor, images, ["a", "bb cc dd ee ff gg"], ["studio bright vivid neon", "neon"])
        with torch.no_grad():
            got, want = response_logps(model, batch), full_response_logps(model, batch)
        assert torch.allclose(got, want, atol=1e-4), (side, got, want)
    with left_padded(processor):
        assert processor.tokenizer.padding_side == "left"


# LLaVA-NeXT (the family that crashed) in the quick subset; the Qwen families with the end-to-end tests
@pytest.mark.parametrize("family", [FAMILIES[0], *(pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES[1:])])
def test_zero3_generation_gathers_once_and_equals_plain_generation(hub_models, family, tmp_path):
    """LLaVA-NeXT's image_newline is used outside a module's forward: under ZeRO-3 it is an empty
    partition unless the model is gathered for the call (it crashed on the first sampling)."""
    script = f"""
import json, os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str({29400 + FAMILIES.index(family)}), RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from caig_ray.ds import init_distributed
init_distributed(use_gpu=False)  # gloo, DeepSpeed's shm op not built
from caig_ray.ds import deepspeed_config, gathered_for_generation
from caig_ray.models.policy import load_policy
from caig_ray.policy_ops import generate_descriptions
from caig_ray.testing.hub_families import PROBE_INSTRUCTIONS as ins, probe_images
model, processor = load_policy({str(hub_models[family])!r})
images = probe_images()
plain = generate_descriptions(model, processor, images, ins, 2, 1.0, 0, 8)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5),
                                  config=deepspeed_config(3, "float32"))
with gathered_for_generation(engine, 3) as module:
    zero3 = generate_descriptions(module, processor, images, ins, 2, 1.0, 0, 8)
json.dump({{"plain": plain, "zero3": zero3}}, open(sys.argv[1], "w"))
"""
    out = tmp_path / "gen.json"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["zero3"] == result["plain"]
