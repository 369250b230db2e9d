import numpy as np
import pytest
from PIL import Image

from caig_ray.config import RendererConfig
from caig_ray.imaging import place_product
from caig_ray.market import make_catalog
from caig_ray.models.renderer import DiffusersRenderer, control_and_mask, make_renderer

SIZE = 64


@pytest.fixture(scope="module")
def renderer(quick_world):
    return DiffusersRenderer(RendererConfig(
        kind="diffusers", sd_path=str(quick_world.sd), controlnet_path=str(quick_world.controlnet),
        image_size=SIZE, steps=3, batch_size=4))


@pytest.fixture(scope="module")
def products():
    return make_catalog(["cosmetics", "kitchen"], 2, 96, seed=1)


def test_product_pixels_are_kept(renderer, products):
    ads = renderer.render([p.image for p in products], ["bright stadium", "dark neon"], [3, 4])
    for prod, ad in zip(products, ads):
        placed = place_product(prod.image, SIZE)
        solid = np.asarray(placed.getchannel("A")) == 255
        assert solid.sum() > 100
        assert np.array_equal(np.asarray(ad.image)[solid], np.asarray(placed.convert("RGB"))[solid])
        assert ad.image.size == (SIZE, SIZE)


def test_same_prompt_and_seed_same_image_different_prompt_different_background(renderer, products):
    img = products[0].image
    a, b, c, d = renderer.render([img] * 4, ["bright stadium", "bright stadium", "pastel vanity", "bright stadium"],
                                 [9, 9, 9, 10])
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    bg = np.asarray(place_product(img, SIZE).getchannel("A")) == 0
    diff = lambda x, y: np.abs(np.asarray(x.image, float) - np.asarray(y.image, float))[bg].mean()  # noqa: E731
    assert diff(a, c) > 1.0  # the prompt changes the background
    assert diff(a, d) > 1.0  # and so does the seed
    # batching does not change what one pair gets: rendered alone, the same (prompt, seed) image
    alone = renderer.render([img], ["pastel vanity"], [9])[0]
    assert np.abs(np.asarray(alone.image, float) - np.asarray(c.image, float)).max() < 2


def test_control_image_and_mask(products):
    placed = place_product(products[0].image, SIZE)
    alpha = np.asarray(placed.getchannel("A"))
    white, control, mask = control_and_mask(placed, 100, 200, 3)
    m, edges = np.asarray(mask), np.asarray(control)[..., 0]
    assert (m[alpha == 0] == 255).all()  # the whole background is repainted
    assert m[alpha == 255].min() == 0 and (m > 0).sum() > (alpha == 0).sum()  # dilated into the product rim
    assert edges.max() == 255 and edges[alpha == 0].sum() < edges.sum()  # canny of the product only
    far = np.ones_like(alpha, bool)
    far[max(0, np.nonzero(alpha)[0].min() - 2):np.nonzero(alpha)[0].max() + 3,
        max(0, np.nonzero(alpha)[1].min() - 2):np.nonzero(alpha)[1].max() + 3] = False
    assert edges[far].sum() == 0


def test_renderer_choice_and_clear_errors(tmp_path):
    assert make_renderer(RendererConfig()).kind == "procedural"
    with pytest.raises(FileNotFoundError, match="needs renderer.sd_path"):
        make_renderer(RendererConfig(kind="diffusers"))
    with pytest.raises(FileNotFoundError, match="renderer.sd_path: model folder not found"):
        make_renderer(RendererConfig(kind="diffusers", sd_path=str(tmp_path / "x"), controlnet_path=str(tmp_path)))


def test_fp16_variant_folder_loads_only_with_renderer_variant(hub_models):
    from caig_ray.models.vlm import ModelFolderError

    cfg = dict(kind="diffusers", sd_path=str(hub_models["sd_fp16"]), controlnet_path=str(hub_models["controlnet_fp16"]),
               image_size=64, steps=2)
    with pytest.raises(ModelFolderError, match=r"missing unet/\*\.safetensors.*renderer.variant: fp16"):
        make_renderer(RendererConfig(**cfg))
    renderer = make_renderer(RendererConfig(**cfg, variant="fp16"))
    product = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    product.paste((200, 20, 20, 255), (12, 12, 36, 36))
    (ad,) = renderer.render([product], ["a sunny beach"], [3])
    assert ad.image.size == (64, 64)


def test_scheduler_comes_from_config_not_the_folder(hub_models):
    """The SD folder ships PNDM (as runwayml's inpainting does); CAIG samples with Euler-ancestral."""
    import json as _json

    shipped = _json.loads((hub_models["sd"] / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    assert shipped == "PNDMScheduler"
    base = dict(kind="diffusers", sd_path=str(hub_models["sd"]), controlnet_path=str(hub_models["controlnet"]),
                image_size=64, steps=2)
    assert type(make_renderer(RendererConfig(**base)).pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert type(make_renderer(RendererConfig(**base, scheduler="folder")).pipe.scheduler).__name__ == "PNDMScheduler"
