"""The prompt model (PM): an image-text-to-text MLLM that writes background descriptions."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, Qwen2VLForConditionalGeneration

from caig_ray.config import TinyBackboneConfig
from caig_ray.models.vlm import DTYPES, build_tiny_processor, load_processor, tiny_vlm_config


def make_tiny_policy(tiny: TinyBackboneConfig, out_dir: str | Path, corpus: list[str]) -> Path:
    """Build the tiny PM (random weights, a tokenizer trained on ``corpus``) and save it; load it with
    ``load_policy``."""
    processor = build_tiny_processor(tiny, max_pixels=tiny.image_size * tiny.image_size, corpus=corpus)
    torch.manual_seed(tiny.seed)
    model = Qwen2VLForConditionalGeneration(tiny_vlm_config(tiny, processor.tokenizer))
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def load_policy(path: str | Path, dtype: str = "float32", device: str | None = "cpu"):
    """(model, processor) from a folder -- a real checkpoint or a tiny one alike; an object-store URI
    is read through this node's cache (``caig_ray.storage.local_model``). ``device`` None leaves the
    weights where loading put them (under ZeRO-3's ``zero.Init``: partitioned)."""
    from caig_ray.storage import local_model

    path = local_model(path)
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=DTYPES[dtype])
    return (model if device is None else model.to(device)), load_processor(path)
