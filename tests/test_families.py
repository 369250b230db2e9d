"""The real checkpoint families (LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL; SD1.5 inpainting + ControlNet) in
their hub layouts, through the core: loading, sampling, the RM's prompt and weights, the renderer.
Each test guards a defect that held only for our own tiny factory (issue 11)."""

import contextlib

import pytest
import torch

from caig_ray.testing.hub_families import FAMILIES
from caig_ray.testing.hub_families import PROBE_INSTRUCTIONS as INS
from caig_ray.testing.hub_families import probe_images as _images

pytestmark = pytest.mark.parametrize("family", FAMILIES)




def test_policy_loads_with_the_stock_processor_and_keeps_the_checkpoint_padding(hub_models, family):
    from caig_ray.models.policy import load_policy

    model, processor = load_policy(hub_models[family])
    stock = {"llava_next": "LlavaNextProcessor", "qwen2_vl": "CaigVLProcessor", "qwen2_5_vl": "CaigVLProcessor"}
    assert type(processor).__name__ == stock[family]
    assert model.config.model_type == family
    assert processor.tokenizer.padding_side == "right"  # as the folder ships it


def test_generation_pads_left_whatever_the_checkpoint_ships(hub_models, family):
    """Right padding would put pad tokens between a short prompt and its sampled continuation."""
    from caig_ray.models.policy import load_policy
    from caig_ray.policy_ops import generate_descriptions

    model, processor = load_policy(hub_models[family])
    assert processor.tokenizer.padding_side == "right"
    seen = {}
    real_generate = model.generate

    def spy(**kw):
        seen["mask"] = kw["attention_mask"].clone()
        return real_generate(**kw)

    model.generate = spy
    generate_descriptions(model, processor, _images(), INS, 2, 1.0, 0, 6)
    mask = seen["mask"]
    assert (mask[:, -1] == 1).all(), "every prompt must end at the last column (left padding)"
    assert (mask[:, 0] == 0).any(), "prompts of different lengths: the shorter one is padded on the left"
    assert processor.tokenizer.padding_side == "right"  # restored for training batches


def test_sampling_never_emits_special_or_vision_tokens(hub_models, family):
    from caig_ray.models.policy import load_policy
    from caig_ray.policy_ops import special_token_ids

    model, processor = load_policy(hub_models[family])
    banned = set(special_token_ids(processor))
    tok = processor.tokenizer
    image_token = tok.convert_tokens_to_ids(processor.image_token)
    assert image_token in banned and tok.pad_token_id in banned and tok.eos_token_id not in banned
    # sampling from the random model with a biased lm_head: special tokens get most of the mass
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[sorted(banned)] *= 50
    enc = processor(text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INS[0]}]}],
        add_generation_prompt=True, tokenize=False)], images=_images()[:1], return_tensors="pt")
    out = model.generate(**enc, do_sample=True, max_new_tokens=12, suppress_tokens=sorted(banned),
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    assert not set(new) & banned


def test_dpo_trains_on_the_sampled_token_ids(hub_models, family):
    """The response a training batch scores is the sampled one token for token (not its decoded,
    cleaned, re-tokenised text), and its log-prob is the same in a padded batch as alone."""
    from caig_ray.models.policy import load_policy
    from caig_ray.policy_ops import build_batch, generate_descriptions, left_padded, response_logps

    model, processor = load_policy(hub_models[family])
    gens = generate_descriptions(model, processor, _images(), INS, 2, 1.0, 3, 8)
    sampled = [g["token_ids"][0] for g in gens] + [gens[0]["token_ids"][1]]
    assert all(len(ids) >= 1 for ids in sampled) and len({len(x) for x in sampled}) >= 1
    images, ins = _images() + _images()[:1], INS + INS[:1]
    for padded_left in (False, True):
        ctx = left_padded(processor) if padded_left else contextlib.nullcontext()
        with ctx:
            batch = build_batch(processor, images, ins, sampled)
            alone = [build_batch(processor, [im], [i], [ids]) for im, i, ids in zip(images, ins, sampled)]
        for row, ids in enumerate(sampled):
            got = batch["input_ids"][row][batch["response_mask"][row].bool()].tolist()
            assert got == ids  # token for token
        with torch.no_grad():
            together = response_logps(model, batch)
            each = torch.cat([response_logps(model, b) for b in alone])
        assert torch.allclose(together, each, atol=1e-4), (padded_left, together, each)


def test_rm_two_images_prompt_keeps_labels_next_to_their_images(hub_models, family):
    from caig_ray.models.vlm import load_processor
    from caig_ray.scoring import PairToScore, rm_inputs

    processor = load_processor(hub_models[family])
    a, b = _images()
    enc = rm_inputs(processor, [PairToScore(a, b, "red sneakers")], 56, layout="two_images")
    text = processor.tokenizer.decode(enc["input_ids"][0])
    image = processor.image_token
    left, right, question = text.find("Left ad:"), text.find("Right ad:"), text.find("Comparing")
    first, last = text.find(image), text.rfind(image)
    assert 0 <= left < first < right < last < question, text[:200]


def test_rm_training_asks_each_pair_its_own_question(hub_models, family):
    from caig_ray.models.vlm import load_processor
    from caig_ray.prompts import RM_TEMPLATES
    from caig_ray.scoring import PairToScore, rm_inputs

    processor = load_processor(hub_models[family])
    a, b = _images()
    pairs = [PairToScore(a, b, "red sneakers"), PairToScore(b, a, "blue lamp")]
    enc = rm_inputs(processor, pairs, 56, template=[0, 4], layout="two_images")
    texts = [processor.tokenizer.decode(row) for row in enc["input_ids"]]
    assert RM_TEMPLATES[0].format(title="red sneakers") in texts[0]
    assert RM_TEMPLATES[4].format(title="blue lamp") in texts[1]


def test_rm_backbone_is_the_checkpoints_weights(hub_models, family):
    """The RM built from a generation checkpoint keeps its backbone (hub weight names mapped)."""
    from caig_ray.models.policy import load_policy
    from caig_ray.models.reward import load_reward_model

    pm, _ = load_policy(hub_models[family])
    rm, _ = load_reward_model(hub_models[family], from_backbone=True)
    pm_state = {k.removeprefix("model."): v for k, v in pm.state_dict().items() if k.startswith("model.")}
    rm_state = {k.removeprefix("model."): v for k, v in rm.state_dict().items() if k.startswith("model.")}
    assert pm_state.keys() == rm_state.keys() and len(pm_state) > 10
    for k in pm_state:
        assert torch.equal(pm_state[k], rm_state[k]), k
