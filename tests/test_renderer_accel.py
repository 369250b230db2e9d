"""The diffusers renderer's speed options (``RendererConfig``: channels_last, fuse_qkv, compile,
generator_device) against the plain pipeline, on CPU with the tiny hub SD.

Tolerance for "the same images": max |difference| <= 2 and mean <= 0.05 on 0..255 pixels. The options
compute the same sums in another order (channels_last and compiled convolutions, one fused q/k/v
matmul), so float32 rounding (~1e-7 relative) differs; through the denoising steps and the VAE it
moves a decoded value by far less than one grey level, which shows only where a value sits on a
uint8 rounding boundary: a few pixels by 1 (2 leaves room for one more rounding on the way). A real
change of the computation moves pixels by tens: another seed does (``test_the_tolerance_tells_...``).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from caig_ray.config import ConfigError, RendererConfig, load_config
from caig_ray.imaging import paste_product, place_product
from caig_ray.models.renderer import DiffusersRenderer, control_and_mask
from caig_ray.prompts import clean_prompt

MAX_DIFF, MEAN_DIFF = 2, 0.05
DESCRIPTIONS = ["a bright stadium at night", "a pastel vanity, soft light", "a dark neon street"]
SEEDS = [3, 4, 5]


def product(k: int) -> Image.Image:
    img = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    img.paste((60 + 50 * k, 120, 200 - 40 * k, 255), (20 + 4 * k, 16, 76, 84 - 6 * k))
    return img


PRODUCTS = [product(k) for k in range(3)]


@pytest.fixture(scope="module")
def base(hub_models):
    # batch_size 2 over 3 products: a full and a partial batch, two batch shapes
    return dict(kind="diffusers", sd_path=str(hub_models["sd"]), controlnet_path=str(hub_models["controlnet"]),
                image_size=64, steps=3, batch_size=2)


@pytest.fixture(scope="module")
def plain(base):
    renderer = DiffusersRenderer(RendererConfig(**base))
    return renderer, pixels(renderer.render(PRODUCTS, DESCRIPTIONS, SEEDS))


def pixels(ads) -> np.ndarray:
    return np.stack([np.asarray(ad.image, dtype=np.int16) for ad in ads])


def first_conv(model) -> torch.nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def unchanged_render(renderer: DiffusersRenderer) -> np.ndarray:
    """The render loop as it was before the speed options (commit 02e2447): the empty negative prompt
    encoded by the pipeline at every call, CPU generators."""
    c, out = renderer.cfg, []
    for start in range(0, len(PRODUCTS), c.batch_size):
        sl = slice(start, start + c.batch_size)
        placed = [place_product(p, c.image_size, c.product_fill) for p in PRODUCTS[sl]]
        prepared = [control_and_mask(p, c.canny_low, c.canny_high, renderer.dilate) for p in placed]
        prompts = [clean_prompt(d) for d in DESCRIPTIONS[sl]]
        images = renderer.pipe(
            prompt=prompts, negative_prompt=[""] * len(prompts),
            image=[p[0] for p in prepared], control_image=[p[1] for p in prepared],
            mask_image=[p[2] for p in prepared],
            height=c.image_size, width=c.image_size, num_inference_steps=c.steps,
            guidance_scale=c.guidance_scale, controlnet_conditioning_scale=c.controlnet_scale,
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in SEEDS[sl]], output_type="pil",
        ).images
        out += [np.asarray(paste_product(img, pl), dtype=np.int16) for img, pl in zip(images, placed)]
    return np.stack(out)


def assert_same_within_rounding(got: np.ndarray, want: np.ndarray) -> None:
    diff = np.abs(got - want)
    assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (diff.max(), diff.mean())


def test_the_default_config_builds_the_plain_pipeline(plain):
    default = RendererConfig()
    assert (default.channels_last, default.fuse_qkv, default.compile) == (False, False, False)
    assert (default.compile_mode, default.generator_device) == ("default", "cpu")
    renderer, _ = plain
    pipe = renderer.pipe
    for model in (pipe.unet, pipe.controlnet, pipe.vae):
        assert not isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        assert {type(p).__name__ for p in model.attn_processors.values()} == {"AttnProcessor2_0"}
    assert first_conv(pipe.unet).weight.is_contiguous()  # NCHW, not channels_last
    assert renderer.generator_device == torch.device("cpu")


def test_default_images_are_bit_identical_to_the_unchanged_render_loop(plain):
    renderer, images = plain
    assert np.array_equal(images, unchanged_render(renderer))
    # the cached negative-prompt embeddings serve the next call the same images
    assert np.array_equal(pixels(renderer.render(PRODUCTS, DESCRIPTIONS, SEEDS)), images)


def test_the_empty_negative_prompt_is_encoded_once_per_batch_shape(plain):
    renderer, _ = plain
    calls = []
    hook = renderer.pipe.text_encoder.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    try:
        renderer.render(PRODUCTS, DESCRIPTIONS, SEEDS)
    finally:
        hook.remove()
    assert calls == [2, 1]  # the prompts of each batch only: the empty prompt of 2 and of 1 is cached


def test_the_tolerance_tells_a_changed_image(plain):
    renderer, images = plain
    other_seed = pixels(renderer.render(PRODUCTS, DESCRIPTIONS, [s + 1 for s in SEEDS]))
    with pytest.raises(AssertionError):
        assert_same_within_rounding(other_seed, images)


@pytest.mark.parametrize("options", [
    {"channels_last": True}, {"fuse_qkv": True}, {"generator_device": "device"},
    {"channels_last": True, "fuse_qkv": True, "generator_device": "device"},
], ids=["channels_last", "fuse_qkv", "generator_device", "all_but_compile"])
def test_each_option_renders_the_plain_images(base, plain, options):
    renderer = DiffusersRenderer(RendererConfig(**base, **options))
    pipe = renderer.pipe
    if options.get("fuse_qkv"):
        for model in (pipe.unet, pipe.controlnet, pipe.vae):
            assert {type(p).__name__ for p in model.attn_processors.values()} == {"FusedAttnProcessor2_0"}
        assert pipe.controlnet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_qkv is not None
    if options.get("channels_last"):
        for model in (pipe.unet, pipe.controlnet, pipe.vae):
            assert first_conv(model).weight.is_contiguous(memory_format=torch.channels_last)
    images = pixels(renderer.render(PRODUCTS, DESCRIPTIONS, SEEDS))
    if set(options) == {"generator_device"}:
        # on CPU the render device's generator is a CPU generator: the very same numbers
        assert renderer.generator_device == torch.device("cpu")
        assert np.array_equal(images, plain[1])
    assert_same_within_rounding(images, plain[1])


def test_compile_captures_unet_and_controlnet_whole(base, plain, monkeypatch):
    """compile: true wraps both models in torch.compile with a full graph (no graph break) and one
    static graph per batch shape. The inductor backend takes minutes to generate C++ here (2 shared
    cores), so this captures with "aot_eager" (the same Dynamo and AOT graphs, run by eager kernels);
    inductor itself runs in the GPU check (tests/test_gpu_renderer.py: plain vs compiled on the card)."""
    compile_calls = []
    real_compile = torch.compile

    def capturing(model, **kwargs):
        compile_calls.append((type(model).__name__, kwargs))
        return real_compile(model, backend="aot_eager", fullgraph=kwargs["fullgraph"], dynamic=kwargs["dynamic"])

    monkeypatch.setattr(torch, "compile", capturing)
    torch._dynamo.reset()
    renderer = DiffusersRenderer(RendererConfig(**base, compile=True, compile_mode="reduce-overhead"))
    assert [name for name, _ in compile_calls] == ["UNet2DConditionModel", "ControlNetModel"]
    assert all(kw == {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False} for _, kw in compile_calls)
    assert isinstance(renderer.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert_same_within_rounding(pixels(renderer.render(PRODUCTS, DESCRIPTIONS, SEEDS)), plain[1])
    torch._dynamo.reset()


def test_speed_options_are_validated():
    with pytest.raises(ValueError, match="compile_mode 'reduce-overhead' needs compile: true"):
        RendererConfig(compile_mode="reduce-overhead")
    assert RendererConfig(compile=True, compile_mode="reduce-overhead").compile_mode == "reduce-overhead"
    with pytest.raises(ValueError, match="generator_device"):
        RendererConfig(generator_device="cuda")
    with pytest.raises(ConfigError, match="renderer.*compile_mode 'max-autotune' needs compile"):
        load_config("quick", overrides={"renderer": {"compile_mode": "max-autotune"}})
