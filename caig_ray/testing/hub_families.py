"""Tiny random checkpoints of the REAL families, saved in the hub's own folder layout (docs/models.md, the real families).

No real checkpoint can be downloaded here, so the real path is tested with models built from the
stock transformers/diffusers classes at toy sizes and written exactly as the hub repos lay them out:

- ``llava_next``: llava-hf/llava-v1.6-vicuna-7b-hf -- ``LlavaNextForConditionalGeneration`` with a
  Llama text model and a CLIP vision tower, weights under the *legacy* names
  (``language_model.model.*``, ``language_model.lm_head.*``, ``vision_tower.*``,
  ``multi_modal_projector.*``, ``image_newline``), a Llama tokenizer with ``<image>`` and ``<pad>``
  added, the Vicuna chat template that renders every image before the text, and
  ``preprocessor_config.json`` / ``processor_config.json`` / ``chat_template.json``.
- ``qwen2_vl`` / ``qwen2_5_vl``: Qwen/Qwen2(.5)-VL-7B-Instruct -- the stock classes, the Qwen
  special tokens and ChatML template, ``Qwen2VLImageProcessor`` and a video processor config.
- SD1.5 inpainting + ControlNet canny: diffusers' folder layout, optionally only ``fp16`` variant files.

The tokenizers ship padding on the RIGHT and no ``padding_side`` assumption of ours: whatever holds
only for our own tiny factory must not be relied on by the loading and sampling code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from caig_ray.market.corpus import market_corpus
from caig_ray.models.tokenizers import QWEN_SPECIAL

FAMILIES = ("llava_next", "qwen2_vl", "qwen2_5_vl")
# Each family's every-entrypoint chain runs once per suite: one by the job functions
# (tests/test_families_entrypoints.py; also the ZeRO-3 online round's family), one by the CLI mains with
# --storage on a shared folder, two of its jobs by `ray job submit` (tests/test_job_submit.py), one on
# the object store (tests/test_storage.py)
FUNCTION_CHAIN_FAMILY = "llava_next"
CLI_STORAGE_CHAIN_FAMILY = "qwen2_5_vl"
OBJECT_STORE_CHAIN_FAMILY = "qwen2_vl"
# what the sampling tests give every family: two products of different sizes and aspect ratios, and
# instructions of different lengths (padding must not change a sample)
PROBE_INSTRUCTIONS = ["Write a background for red sneakers",
                      "Describe a scene for a blue desk lamp with a long title, a longer one than the first by many words"]


def probe_images() -> list:
    from PIL import Image

    return [Image.new("RGB", (96, 96), (200, 30, 30)), Image.new("RGB", (60, 90), (10, 90, 200))]


def tiny_chain_overrides(model_path) -> dict:
    """Config overrides (over the ``quick`` preset) for one quick pass of every entrypoint on a family's
    tiny checkpoint: a few examples per job, one online round of 4 products. ``tie_margin`` None: the
    random tiny PM's two samples often render the same plain ad (a tie, which the default skips), and
    every family must take DPO+PCPO steps through the loop."""
    return {
        "policy": {"model_path": str(model_path), "lr": 1e-3, "max_new_tokens": 8},
        "pretrain": {"epochs": 1, "max_examples": 8, "batch_size": 2, "eval_products": 2},
        "train_rm": {"epochs": 1, "max_pairs": 8, "batch_size": 2, "zero_stage": 3},
        "online": {"rounds": 1, "products_per_round": 4, "eval_products": 2, "pairs_per_batch": 2,
                   "train_batch_size": 4, "seed": 3, "tie_margin": None},
    }

# llava-hf's Vicuna template: images first, then the text of the turn (so "Left ad: <img>" needs care)
LLAVA_VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Qwen2-VL-Instruct's ChatML template (system turn added by default, images inline in order)
QWEN_CHATML_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

def _bpe(corpus: list[str], vocab_size: int, special: list[str], metaspace: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if metaspace:  # SentencePiece-style (Llama): "▁" word marks, byte fallback
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        alphabet = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special + alphabet)
    else:  # ByteLevel (Qwen2)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def _legacy_llava_names(folder: Path) -> None:
    """Rewrite the weights under llava-hf's original key names (what the hub repos hold)."""
    path = folder / "model.safetensors"
    state = load_file(str(path))
    renames = [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower.vision_model."),
               ("model.multi_modal_projector.", "multi_modal_projector."), ("model.image_newline", "image_newline"),
               ("lm_head.", "language_model.lm_head.")]
    out = {}
    for key, value in state.items():
        for new, old in renames:
            if key.startswith(new):
                key = old + key[len(new):]
                break
        out[key] = value.contiguous()
    save_file(out, str(path), metadata={"format": "pt"})


def _hub_processor_files(folder: Path, image_processor_type: str, processor_class: str) -> None:
    """transformers 5 writes one ``processor_config.json`` (image processor nested) and
    ``chat_template.jinja``; the hub repos hold ``preprocessor_config.json``, a flat
    ``processor_config.json`` and ``chat_template.json``. Rewrite to the hub's files."""
    proc_path = folder / "processor_config.json"
    proc = json.loads(proc_path.read_text()) if proc_path.is_file() else {}
    image = proc.pop("image_processor", None) or json.loads((folder / "preprocessor_config.json").read_text())
    image["image_processor_type"] = image_processor_type
    image.setdefault("processor_class", processor_class)
    (folder / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    proc.pop("video_processor", None)
    proc["processor_class"] = processor_class
    proc_path.write_text(json.dumps(proc, indent=2))
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": jinja.read_text()}, indent=2))
        jinja.unlink()
    tok_cfg = folder / "tokenizer_config.json"
    data = json.loads(tok_cfg.read_text())
    data["processor_class"] = processor_class
    tok_cfg.write_text(json.dumps(data, indent=2))


# model sizes: "tiny" for tests; "mid" (~100M parameters) keeps what drives a 7B's memory per token --
# the real CLIP input (336 px, anyres tiles: ~2,900 image tokens for a 672 px tile grid) and the real
# 32,064-token vocabulary -- at a width a benchmark can run many steps of (bench/policy_memory.py)
LLAVA_SIZES = {
    "tiny": dict(vision_size=56, vocab=0, text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)),
    "mid": dict(vision_size=336, vocab=32064, text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                                        num_attention_heads=8, num_key_value_heads=8),
                vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6)),
    # llava-v1.6-vicuna-7b's shapes: Vicuna-7B (Llama-2-7B) and CLIP ViT-L/14-336 (scripts/gpu_check.sh's
    # 7B-size step; random weights cost the same time and memory as trained ones)
    "7b": dict(vision_size=336, vocab=32064, text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                                       num_attention_heads=32, num_key_value_heads=32),
               vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)),
}


def make_llava_next(out: str | Path, seed: int = 0, size: str = "tiny", device: str = "cpu",
                    dtype: str = "float32") -> Path:
    """A llava-v1.6-vicuna-shaped checkpoint in llava-hf's layout, of ``size`` (``LLAVA_SIZES``); the
    random weights are drawn on ``device`` in ``dtype`` (a 7B in float32 on CPU would take minutes and
    28 GB) and saved in that dtype."""
    from transformers import (
        CLIPVisionConfig, LlamaConfig, LlamaTokenizerFast, LlavaNextConfig, LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    out = Path(out)
    bpe = _bpe(market_corpus(), 480, ["<unk>", "<s>", "</s>"], metaspace=True)
    tokenizer = LlamaTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   add_bos_token=True, add_eos_token=False, padding_side="right")
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    shape = LLAVA_SIZES[size]
    vision_size = shape["vision_size"]
    pinpoints = [[vision_size, 2 * vision_size], [2 * vision_size, vision_size], [2 * vision_size, 2 * vision_size],
                 [vision_size, 3 * vision_size], [3 * vision_size, vision_size]]
    config = LlavaNextConfig(
        text_config=LlamaConfig(**shape["text"], vocab_size=max(len(tokenizer), shape["vocab"]),
                                max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=CLIPVisionConfig(**shape["vision"], image_size=vision_size, patch_size=14, projection_dim=32),
        image_token_index=image_token, image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlavaNextForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": vision_size}, crop_size={"height": vision_size, "width": vision_size},
        image_grid_pinpoints=pinpoints, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", image_token="<image>",
                                   num_additional_image_tokens=1, chat_template=LLAVA_VICUNA_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if size != "7b":  # rewriting 14 GB of shards costs the GPU check a minute; the key names are tested tiny
        _legacy_llava_names(out)
    _hub_processor_files(out, "LlavaNextImageProcessor", "LlavaNextProcessor")
    return out


def make_qwen_vl(out: str | Path, family: str = "qwen2_vl", seed: int = 0, max_pixels: int = 112 * 112) -> Path:
    """A tiny Qwen2-VL / Qwen2.5-VL-Instruct-shaped checkpoint in the Qwen hub layout."""
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2VLConfig
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from caig_ray.models.vlm import CaigVLProcessor

    if family not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"unknown Qwen family {family!r}")
    out = Path(out)
    bpe = _bpe(market_corpus(), 480, QWEN_SPECIAL, metaspace=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=QWEN_SPECIAL[1:], padding_side="right")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                   bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                   pad_token_id=ids["<|endoftext|>"])
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, in_channels=3, temporal_patch_size=2)
        config, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **special), Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                      patch_size=14, spatial_merge_size=2, in_channels=3, temporal_patch_size=2,
                      window_size=56, fullatt_block_indexes=[1])
        config, cls = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special), Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels, patch_size=14, merge_size=2)
    processor = CaigVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHATML_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # the hub repos name the stock processor classes (ours only drops the video processor at load time)
    _hub_processor_files(out, "Qwen2VLImageProcessor",
                         "Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor")
    return out


def make_family(family: str, out: str | Path, seed: int = 0) -> Path:
    """A tiny checkpoint of ``family`` (one of ``FAMILIES``) in its hub layout."""
    if family == "llava_next":
        return make_llava_next(out, seed)
    return make_qwen_vl(out, family, seed)


def make_sd_folders(sd_dir: str | Path, controlnet_dir: str | Path, variant: str | None = None,
                    scheduler: str = "PNDMScheduler", seed: int = 0) -> tuple[Path, Path]:
    """SD1.5 inpainting + ControlNet canny folders as the hub lays them out. ``variant="fp16"``
    writes only ``*.fp16.safetensors`` files in float16 (as many community repos ship them);
    ``scheduler`` is what the folder ships (runwayml's inpainting ships PNDM, not CAIG's Euler-a)."""
    import diffusers
    from diffusers import ControlNetModel, StableDiffusionInpaintPipeline

    from caig_ray.models.renderer import make_tiny_sd

    sd_dir, controlnet_dir = Path(sd_dir), Path(controlnet_dir)
    make_tiny_sd(sd_dir, controlnet_dir, market_corpus(), seed=seed)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(sd_dir), safety_checker=None,
                                                          requires_safety_checker=False)
    sched_cls = getattr(diffusers, scheduler)
    pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
    if variant:
        pipe.to(torch.float16)
        for sub in sd_dir.iterdir():  # only variant files remain, as in an fp16-only repo
            if sub.is_dir():
                for f in sub.glob("*.safetensors"):
                    f.unlink()
        pipe.save_pretrained(str(sd_dir), variant=variant)
        cn = ControlNetModel.from_pretrained(str(controlnet_dir)).to(torch.float16)
        for f in controlnet_dir.glob("*.safetensors"):
            f.unlink()
        cn.save_pretrained(str(controlnet_dir), variant=variant)
    else:
        pipe.save_pretrained(str(sd_dir))
    return sd_dir, controlnet_dir


def make_sd15_random(sd_dir: str | Path, controlnet_dir: str | Path, device: str = "cuda") -> tuple[Path, Path]:
    """SD1.5-SIZE inpainting + ControlNet canny with random weights (UNet 860M, ControlNet 360M, VAE,
    CLIP ViT-L text encoder), saved as fp16-variant folders: measures real render time and memory on
    a GPU without the real weights (docs/models.md, the real families). The tokenizer is the tiny one (ids < 600)."""
    from diffusers import (
        AutoencoderKL, ControlNetModel, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from caig_ray.models.tokenizers import build_clip_tokenizer

    torch.manual_seed(0)
    blocks = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                  attention_head_dim=8, norm_num_groups=32)
    down = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, in_channels=9, out_channels=4, down_block_types=down,
                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **blocks)
        controlnet = ControlNetModel(in_channels=4, down_block_types=down,
                                     conditioning_embedding_out_channels=(16, 32, 96, 256), **blocks)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, norm_num_groups=32, sample_size=512)
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                    num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77,
                                                    projection_dim=768))
    pipe = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(market_corpus(), vocab_size=600), unet=unet,
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(str(sd_dir), variant="fp16")
    controlnet.to(torch.float16).save_pretrained(str(controlnet_dir), variant="fp16")
    return Path(sd_dir), Path(controlnet_dir)
