import numpy as np
import pytest
import torch
from PIL import Image

from caig_ray.imaging import side_by_side
from caig_ray.models.policy import load_policy
from caig_ray.models.reward import last_token_index, load_reward_model
from caig_ray.prompts import pm_instruction, rm_question


def _inputs(processor, images, text):
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
        add_generation_prompt=True, tokenize=False,
    )
    return processor(text=[prompt] * len(images), images=images, return_tensors="pt", padding=True)


def _product_images(n, size=56):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_policy_save_load_round_trip(quick_world, tmp_path):
    model, proc = load_policy(quick_world.policy)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    enc = _inputs(proc, _product_images(2), pm_instruction("red lipstick", {"color": "red"}))
    with torch.no_grad():
        before = model(**enc).logits
    model.save_pretrained(tmp_path / "pm")
    proc.save_pretrained(tmp_path / "pm")
    model2, proc2 = load_policy(tmp_path / "pm")
    enc2 = _inputs(proc2, _product_images(2), pm_instruction("red lipstick", {"color": "red"}))
    assert torch.equal(enc["input_ids"], enc2["input_ids"])
    with torch.no_grad():
        assert torch.equal(model2(**enc2).logits, before)


def test_policy_generation_is_seeded(quick_world):
    model, proc = load_policy(quick_world.policy)
    enc = _inputs(proc, _product_images(2), pm_instruction("blue sneakers"))
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(model.generate(**enc, max_new_tokens=8, do_sample=True, temperature=1.0))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert outs[0].shape[1] > enc["input_ids"].shape[1]


def test_reward_model_heads_and_round_trip(quick_world, tmp_path):
    rm, proc = load_reward_model(quick_world.reward)
    assert rm.score.weight.shape == (2, rm.config.get_text_config().hidden_size)
    assert rm.score.bias is None and rm.ctr_head.bias is None
    pair = [side_by_side(a, b, 28) for a, b in zip(_product_images(2), _product_images(2)[::-1])]
    enc = _inputs(proc, pair, rm_question("red lipstick"))
    with torch.no_grad():
        out = rm(**enc)
    assert out.logits.shape == (2, 2) and out.ctr.shape == (2, 2)
    rm.save_pretrained(tmp_path / "rm")
    proc.save_pretrained(tmp_path / "rm")
    rm2, proc2 = load_reward_model(tmp_path / "rm")
    with torch.no_grad():
        out2 = rm2(**_inputs(proc2, pair, rm_question("red lipstick")))
    assert torch.equal(out.logits, out2.logits) and torch.equal(out.ctr, out2.ctr)


def test_reward_model_from_a_policy_checkpoint(quick_world):
    with pytest.raises(ValueError, match="not a trained reward model"):
        load_reward_model(quick_world.policy)
    rm, _ = load_reward_model(quick_world.policy, from_backbone=True)
    pm, _ = load_policy(quick_world.policy)
    # the backbone comes from the checkpoint, only the heads are new
    assert torch.equal(rm.model.language_model.embed_tokens.weight, pm.model.language_model.embed_tokens.weight)
    assert torch.equal(rm.model.visual.patch_embed.proj.weight, pm.model.visual.patch_embed.proj.weight)


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_index(right).tolist() == [2, 3]
    assert last_token_index(left).tolist() == [3, 3]


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_reward_model(tmp_path)


def test_pair_scorer_batched_equals_one_at_a_time_and_debias_is_symmetric(quick_world):
    from caig_ray.scoring import PairScorer, PairToScore

    rm, proc = load_reward_model(quick_world.reward)
    imgs = _product_images(6)
    pairs = [PairToScore(imgs[i], imgs[i + 3], f"product {i}", {"color": "red"}) for i in range(3)]
    scorer = PairScorer(rm, proc, size=28, batch_size=3)
    batched = scorer.score(pairs)
    single = [PairScorer(rm, proc, size=28, batch_size=1).score([p]) for p in pairs]
    for k in ("p_left", "p_left_debiased", "ctr_left"):
        assert batched[k] == pytest.approx([s[k][0] for s in single], abs=1e-5)
    swapped = scorer.score([PairToScore(p.right, p.left, p.title, p.attributes) for p in pairs])
    # the debiased score of (R, L) is exactly 1 - that of (L, R)
    assert swapped["p_left_debiased"] == pytest.approx([1 - x for x in batched["p_left_debiased"]], abs=1e-6)
    assert all(0 < x < 1 for x in batched["p_left"])


def test_two_image_layout_and_unknown_layout(quick_world):
    from caig_ray.scoring import PairScorer, PairToScore, rm_inputs

    rm, proc = load_reward_model(quick_world.reward)
    imgs = _product_images(4)
    pairs = [PairToScore(imgs[0], imgs[1], "a"), PairToScore(imgs[2], imgs[3], "b")]
    enc = rm_inputs(proc, pairs, 28, layout="two_images")
    assert enc["image_grid_thw"].shape[0] == 4  # two images per pair
    scorer = PairScorer(rm, proc, size=28, layout="two_images")
    fwd = scorer.score(pairs)["p_left_debiased"]
    rev = scorer.score([PairToScore(p.right, p.left, p.title) for p in pairs])["p_left_debiased"]
    assert fwd == pytest.approx([1 - x for x in rev], abs=1e-6)
    with pytest.raises(ValueError, match="unknown pair layout"):
        rm_inputs(proc, pairs, 28, layout="stacked")


def test_generated_duplicates_are_marked(quick_world):
    from caig_ray.policy_ops import generate_descriptions

    model, proc = load_policy(quick_world.policy)
    imgs = _product_images(2)
    # near-greedy sampling repeats itself: every sample after the first is marked a duplicate
    cold = generate_descriptions(model, proc, imgs, ["write a background"] * 2, n=3, temperature=1e-4,
                                 seed=0, max_new_tokens=6)
    assert [g["duplicate"] for g in cold] == [[False, True, True]] * 2
    hot = generate_descriptions(model, proc, imgs, ["write a background"] * 2, n=3, temperature=1.0,
                                seed=0, max_new_tokens=6)
    for g in hot:
        assert g["duplicate"] == [d in g["descriptions"][:k] for k, d in enumerate(g["descriptions"])]
        assert len(g["descriptions"]) == 3
