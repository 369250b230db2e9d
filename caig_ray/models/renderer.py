"""The diffusers renderer, done as CAIG does it (docs/models.md, the diffusers renderer): SD inpainting + ControlNet canny.

The product is cropped to its alpha box and centred at ``product_fill`` of the side; the control
image is the canny edge map of the product only; the inpaint mask is the inverse alpha dilated;
after inpainting the original product is pasted back with the undilated alpha, so its pixels are
kept. Both candidates of a pair are rendered with the same seed, so they differ only by prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

from caig_ray.config import RendererConfig
from caig_ray.imaging import RenderedAd, paste_product, place_product
from caig_ray.errors import ModelFolderError
from caig_ray.prompts import clean_prompt

if TYPE_CHECKING:  # torch is imported where the diffusers renderer needs it: the procedural one runs without it
    import torch


SCHEDULERS = {"euler_ancestral": "EulerAncestralDiscreteScheduler", "euler": "EulerDiscreteScheduler",
              "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "dpm_solver": "DPMSolverMultistepScheduler"}


def check_sd_folders(cfg: RendererConfig) -> None:
    """Refuse SD/ControlNet folders that cannot load, naming the folder and what is missing (the
    weights of ``renderer.variant`` included), before any pipeline is built."""
    if not cfg.sd_path or not cfg.controlnet_path:
        raise ModelFolderError("renderer.kind=diffusers needs renderer.sd_path and renderer.controlnet_path")
    suffix = f".{cfg.variant}.safetensors" if cfg.variant else ".safetensors"
    needs = {"sd_path": ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                         "tokenizer", "scheduler/scheduler_config.json"],
             "controlnet_path": ["config.json"]}
    weights = {"sd_path": ["unet", "vae", "text_encoder"], "controlnet_path": ["."]}
    from caig_ray.storage import local_model

    for key, files in needs.items():
        root = local_model(getattr(cfg, key))  # an object-store URI: this node's cached copy
        if not root.is_dir():
            raise ModelFolderError(f"renderer.{key}: model folder not found: {root}")
        missing = [f for f in files if not (root / f).exists()]
        for sub in weights[key]:
            found = [f for f in (root / sub).glob("*.safetensors")
                     if f.name.endswith(suffix) and (cfg.variant or f.name.count(".") == 1)]
            if not found and not list((root / sub).glob("*.bin")):
                missing.append(f"{sub}/*{suffix}" if sub != "." else f"*{suffix}")
        if missing:
            hint = "" if cfg.variant else " (a folder of only fp16 files needs renderer.variant: fp16)"
            raise ModelFolderError(f"renderer.{key}: {root} is not a usable "
                                    f"{'Stable Diffusion inpainting' if key == 'sd_path' else 'ControlNet'} "
                                    f"folder: missing {', '.join(missing)}{hint}")


def control_and_mask(placed: Image.Image, canny_low: int, canny_high: int, dilate: int) -> tuple[Image.Image, Image.Image, Image.Image]:
    """(init image on white, canny control image of the product only, inpaint mask) for a placed product."""
    alpha = np.asarray(placed.getchannel("A"))
    white = Image.new("RGB", placed.size, (255, 255, 255))
    white.paste(placed.convert("RGB"), (0, 0), placed.getchannel("A"))
    edges = cv2.Canny(cv2.cvtColor(np.asarray(white), cv2.COLOR_RGB2GRAY), canny_low, canny_high)
    near_product = cv2.dilate((alpha > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    edges = np.where(near_product, edges, 0).astype(np.uint8)
    mask = cv2.dilate(255 - alpha, np.ones((dilate, dilate), np.uint8))
    return white, Image.fromarray(np.stack([edges] * 3, -1)), Image.fromarray(mask)


class DiffusersRenderer:
    """Stable Diffusion ControlNet inpainting from local folders; same ``render`` as the procedural one."""

    kind = "diffusers"

    def __init__(self, cfg: RendererConfig, device: str = "cpu", dtype: str = "float32"):
        import diffusers
        import torch
        from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline

        from caig_ray.models.vlm import DTYPES

        check_sd_folders(cfg)
        self.cfg = cfg
        torch_dtype = DTYPES[dtype]
        from caig_ray.storage import local_model

        controlnet = ControlNetModel.from_pretrained(str(local_model(cfg.controlnet_path)), dtype=torch_dtype,
                                                     variant=cfg.variant)
        self.pipe = StableDiffusionControlNetInpaintPipeline.from_pretrained(
            str(local_model(cfg.sd_path)), controlnet=controlnet, safety_checker=None, requires_safety_checker=False,
            dtype=torch_dtype, variant=cfg.variant,
        ).to(device)
        if cfg.scheduler != "folder":  # CAIG's sampler, not whatever the folder happens to ship
            self.pipe.scheduler = getattr(diffusers, SCHEDULERS[cfg.scheduler]).from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        accelerate(self.pipe, cfg)
        # On CUDA a cuda generator draws other numbers than a CPU one from the same seed: opt-in only.
        self.generator_device = torch.device(device) if cfg.generator_device == "device" else torch.device("cpu")
        # CAIG's 20x20 dilation is for 512 px; keep the same fraction of the side at other sizes.
        self.dilate = max(1, round(cfg.mask_dilate * cfg.image_size / 512))
        self._empty_prompt_embeds: dict[int, torch.Tensor] = {}

    def negative_prompt_embeds(self, n: int) -> torch.Tensor | None:
        """The empty negative prompt's text embeddings for a batch of ``n`` (None without CFG), encoded
        once per ``n`` instead of at every call: the same tokens through the same text encoder at the
        same batch shape as the pipeline's own encoding of ``negative_prompt=[""] * n``."""
        if self.cfg.guidance_scale <= 1:  # the pipeline runs no unconditional branch
            return None
        if n not in self._empty_prompt_embeds:
            import torch

            with torch.no_grad():  # as the pipeline's call: no autograd graph kept with the cache
                self._empty_prompt_embeds[n] = self.pipe.encode_prompt(
                    [""] * n, self.pipe._execution_device, 1, do_classifier_free_guidance=False)[0]
        return self._empty_prompt_embeds[n]

    def render(self, products: list[Image.Image], descriptions: list[str], seeds: list[int]) -> list[RenderedAd]:
        if not len(products) == len(descriptions) == len(seeds):
            raise ValueError(
                f"render: products, descriptions and seeds must have one entry each "
                f"(got {len(products)}, {len(descriptions)}, {len(seeds)})"
            )
        import torch

        c, out = self.cfg, []
        for start in range(0, len(products), c.batch_size):
            sl = slice(start, start + c.batch_size)
            placed = [place_product(p, c.image_size, c.product_fill) for p in products[sl]]
            prepared = [control_and_mask(p, c.canny_low, c.canny_high, self.dilate) for p in placed]
            prompts = [clean_prompt(d) for d in descriptions[sl]]
            images = self.pipe(
                prompt=prompts, negative_prompt_embeds=self.negative_prompt_embeds(len(prompts)),
                image=[p[0] for p in prepared], control_image=[p[1] for p in prepared],
                mask_image=[p[2] for p in prepared],
                height=c.image_size, width=c.image_size, num_inference_steps=c.steps,
                guidance_scale=c.guidance_scale, controlnet_conditioning_scale=c.controlnet_scale,
                generator=[torch.Generator(self.generator_device).manual_seed(int(s)) for s in seeds[sl]],
                output_type="pil",
            ).images
            for img, pl, desc, seed in zip(images, placed, descriptions[sl], seeds[sl]):
                out.append(RenderedAd(image=paste_product(img, pl), description=desc, seed=int(seed)))
        return out


def accelerate(pipe, cfg: RendererConfig) -> None:
    """Apply ``cfg``'s speed options (all off by default) to a loaded pipeline, in place: fused q/k/v
    projections, channels_last weights, then ``torch.compile`` of the UNet and the ControlNet, whose
    forwards are all but a few ops of a denoising step."""
    import torch

    if cfg.fuse_qkv:
        from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

        pipe.fuse_qkv_projections(unet=True, vae=True)
        # The pipeline's method leaves the ControlNet out, and ControlNetModel.fuse_qkv_projections
        # (diffusers 0.42) skips its legacy Attention modules silently: fuse them as the UNet's does.
        for module in pipe.controlnet.modules():
            if isinstance(module, Attention):
                module.fuse_projections()
        pipe.controlnet.set_attn_processor(FusedAttnProcessor2_0())
    if cfg.channels_last:
        for model in (pipe.unet, pipe.controlnet, pipe.vae):
            model.to(memory_format=torch.channels_last)
    if cfg.compile:
        # dynamic=False: a static graph per batch shape (a render's last, partial batch is a second one);
        # fullgraph: a graph break would put host work back between the kernels.
        pipe.unet = torch.compile(pipe.unet, mode=cfg.compile_mode, fullgraph=True, dynamic=False)
        pipe.controlnet = torch.compile(pipe.controlnet, mode=cfg.compile_mode, fullgraph=True, dynamic=False)


def make_renderer(cfg: RendererConfig, device: str = "cpu", dtype: str = "float32"):
    """The renderer ``cfg.kind`` names (both share the ``render`` interface); ``device`` and
    ``dtype`` come from ``resources.renderers``."""
    if cfg.kind == "diffusers":
        return DiffusersRenderer(cfg, device, dtype)
    from caig_ray.market.render import ProceduralRenderer

    return ProceduralRenderer(cfg.image_size, cfg.product_fill)


def make_tiny_sd(sd_dir: str | Path, controlnet_dir: str | Path, corpus: list[str], seed: int = 0) -> tuple[Path, Path]:
    """A tiny SD1.5-shaped inpainting model (UNet in_channels=9, VAE with latent factor 8, CLIP text
    encoder with a locally trained tokenizer) and a tiny canny ControlNet, saved as two folders laid
    out like real checkpoints."""
    from diffusers import (
        AutoencoderKL, ControlNetModel, EulerAncestralDiscreteScheduler, StableDiffusionInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    import torch

    from caig_ray.models.tokenizers import build_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(corpus, vocab_size=600)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=32,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    blocks = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                  attention_head_dim=(2, 4), norm_num_groups=8)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **blocks,
    )
    controlnet = ControlNetModel(
        in_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        conditioning_embedding_out_channels=(8, 16, 32, 64), **blocks,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=64,
    )
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(sd_dir)
    controlnet.save_pretrained(controlnet_dir)
    return Path(sd_dir), Path(controlnet_dir)
