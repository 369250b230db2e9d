"""The multimodal LLM backbone shared by the prompt model and the reward model.

Real checkpoints (Qwen2-VL / Qwen2.5-VL, LLaVA-NeXT) load from local folders with
``from_pretrained``; the tiny default is the same Qwen2-VL class built from a small config with
random weights and a locally trained tokenizer, saved to a folder, then loaded by the same code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoProcessor, Qwen2VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from caig_ray.config import TinyBackboneConfig
# re-exported: defined where importing them is light (a driver checks folders before anything loads)
from caig_ray.errors import ModelFolderError  # noqa: F401
from caig_ray.models.folders import SUPPORTED_FAMILIES, check_model_folder  # noqa: F401
from caig_ray.models.tokenizers import build_vlm_tokenizer

QWEN_FAMILY = ("qwen2_vl", "qwen2_5_vl")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CaigVLProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without a video processor: transformers 5's video processors import
    torchvision, which does not load beside the CPU torch wheel. Images use the PIL processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


def tiny_vlm_config(tiny: TinyBackboneConfig, tokenizer) -> Qwen2VLConfig:
    head_dim = tiny.hidden_size // tiny.num_heads
    half = head_dim // 2  # mrope_section must sum to head_dim / 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>")}
    return Qwen2VLConfig(
        text_config=dict(
            hidden_size=tiny.hidden_size, num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_heads,
            num_key_value_heads=tiny.num_kv_heads, intermediate_size=tiny.intermediate_size,
            vocab_size=len(tokenizer), max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
            bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=tiny.vision_depth, embed_dim=tiny.vision_embed_dim, hidden_size=tiny.hidden_size,
            num_heads=2, mlp_ratio=2, patch_size=tiny.vision_patch_size, spatial_merge_size=2,
            in_channels=3, temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_processor(tiny: TinyBackboneConfig, max_pixels: int, corpus: list[str]) -> CaigVLProcessor:
    """The tiny backbone's processor; its tokenizer is trained on ``corpus`` (the world's text)."""
    tokenizer = build_vlm_tokenizer(corpus, tiny.vocab_size)
    unit = tiny.vision_patch_size * 2
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=unit * unit, max_pixels=max_pixels, patch_size=tiny.vision_patch_size, merge_size=2,
    )
    return CaigVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def model_type(path: str | Path) -> str:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"no config.json in model folder {path}: not a saved model")
    return json.loads(cfg.read_text()).get("model_type", "")


def load_processor(path: str | Path):
    """The processor saved beside a model. Qwen-VL folders load with ``CaigVLProcessor`` itself
    (``AutoProcessor`` would return only the tokenizer for it); others through ``AutoProcessor``."""
    if model_type(path) in QWEN_FAMILY or model_type(path) == "caig_reward":
        return CaigVLProcessor.from_pretrained(str(path))
    return AutoProcessor.from_pretrained(str(path))

