"""What the prompt model does, without Ray: build (image, instruction, response) batches, sum
response log-probs, sample descriptions, and one DPO+PCPO step's loss.

``actors/policy.py`` wraps these in DeepSpeed engines inside Ray actors.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from PIL import Image

from caig_ray.losses import dpo_pcpo_loss, sequence_logps
from caig_ray.pcpo import pcpo_negative


def as_image(value, size: int | None = None) -> Image.Image:
    """PIL image from a PIL image or encoded bytes; RGBA products are composited onto white."""
    img = value if isinstance(value, Image.Image) else Image.open(io.BytesIO(bytes(value)))
    if img.mode in ("RGBA", "LA", "P"):
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba.convert("RGB"), (0, 0), rgba.getchannel("A"))
        img = white
    img = img.convert("RGB")
    return img.resize((size, size)) if size else img


def _prompt(processor, instruction: str) -> str:
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}],
        add_generation_prompt=True, tokenize=False,
    )


def build_batch(processor, images: list[Image.Image], instructions: list[str], responses: list[str]) -> dict:
    """Tokenised prompt+response with ``response_mask`` (1 on response tokens and the closing
    end-of-turn token, 0 on prompt and padding)."""
    eos = processor.tokenizer.eos_token or ""
    prompts = [_prompt(processor, ins) for ins in instructions]
    full = processor(text=[p + r + eos for p, r in zip(prompts, responses)], images=images,
                     return_tensors="pt", padding=True)
    prompt_only = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    prompt_len = prompt_only["attention_mask"].sum(1)
    real = full["attention_mask"].sum(1)
    width = full["input_ids"].shape[1]
    pos = torch.arange(width).unsqueeze(0)
    left = processor.tokenizer.padding_side == "left"
    start = (width - real + prompt_len) if left else prompt_len
    end = width if left else real
    full["response_mask"] = ((pos >= start.unsqueeze(1)) & (pos < torch.as_tensor(end).reshape(-1, 1))).long()
    return full


def response_logps(model, batch: dict) -> torch.Tensor:
    """Summed log π(response | image, instruction) per row."""
    inputs = {k: v for k, v in batch.items() if k != "response_mask"}
    logits = model(**inputs).logits
    return sequence_logps(logits, batch["input_ids"], batch["response_mask"])


def special_token_ids(processor) -> list[int]:
    """Tokens a description must not contain, for any family: every special or added control token
    the checkpoint's tokenizer declares (vision/image/video placeholders, chat markers, bos, pad,
    unk), except the end-of-turn token that ends the description."""
    tok = processor.tokenizer
    ids = set(tok.all_special_ids)
    ids |= {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    for name in ("image_token", "video_token", "vision_start_token", "vision_end_token"):
        token = getattr(processor, name, None)
        if isinstance(token, str):
            ids.add(tok.convert_tokens_to_ids(token))
    return sorted(i for i in ids if i is not None and i != tok.eos_token_id and 0 <= i < len(tok))


@contextlib.contextmanager
def left_padded(processor):
    """Generation appends to the end of every row, so prompts must be padded on the left whatever
    padding side the checkpoint's tokenizer ships (llava-hf and Qwen folders differ)."""
    tok = processor.tokenizer
    saved = tok.padding_side
    tok.padding_side = "left"
    try:
        yield
    finally:
        tok.padding_side = saved


@torch.no_grad()
def generate_descriptions(model, processor, images: list[Image.Image], instructions: list[str], n: int,
                          temperature: float, seed: int, max_new_tokens: int, synced_gpus: bool = False,
                          device: str = "cpu") -> list[dict]:
    """``n`` sampled descriptions per product (T = ``temperature``, top-p off, one beam); each
    product's list marks repeats of an earlier sample as duplicates."""
    torch.manual_seed(seed)
    with left_padded(processor):
        enc = processor(text=[_prompt(processor, i) for i in instructions], images=images,
                        return_tensors="pt", padding=True).to(device)
    tok = processor.tokenizer
    out = model.generate(
        **enc, do_sample=True, temperature=temperature, top_p=1.0, top_k=0, num_beams=1,
        num_return_sequences=n, max_new_tokens=max_new_tokens, suppress_tokens=special_token_ids(processor),
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        synced_gpus=synced_gpus,
    )
    texts = processor.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    results = []
    for i in range(len(instructions)):
        mine = [t.strip() for t in texts[i * n:(i + 1) * n]]
        results.append({"descriptions": mine, "duplicate": [t in mine[:k] for k, t in enumerate(mine)]})
    return results


def dpo_pcpo_step_loss(model, ref_model, processor, examples: list[dict], beta: float, pcpo_weight: float,
                       image_size: int | None, device: str = "cpu") -> tuple[torch.Tensor, dict]:
    """Loss of one batch. Each example: ``image`` (bytes or PIL), ``instruction``, ``chosen``,
    ``rejected`` and ``seed`` (its PCPO coin flip and patch mask)."""
    images = [as_image(e["image"], image_size) for e in examples]
    ins = [e["instruction"] for e in examples]
    chosen, rejected = [e["chosen"] for e in examples], [e["rejected"] for e in examples]
    n = len(examples)
    rows_img, rows_ins, rows_resp = images + images, ins + ins, chosen + rejected
    if pcpo_weight > 0:
        negs = [pcpo_negative(i, images, ins, chosen, np.random.default_rng(int(e["seed"])))
                for i, e in enumerate(examples)]
        rows_img += [g["image"] for g in negs]
        rows_ins += [g["instruction"] for g in negs]
        rows_resp += [g["response"] for g in negs]
    batch = build_batch(processor, rows_img, rows_ins, rows_resp).to(device)
    pi = response_logps(model, batch)
    with torch.no_grad():
        ref = response_logps(ref_model, batch)
    dpo = (pi[:n], pi[n:2 * n], ref[:n], ref[n:2 * n])
    pcpo = (pi[:n], pi[2 * n:], ref[:n], ref[2 * n:]) if pcpo_weight > 0 else None
    loss, metrics = dpo_pcpo_loss(dpo, pcpo, beta, pcpo_weight)
    if pcpo_weight > 0:
        metrics["pcpo/masked_image_share"] = float(np.mean([g["kind"] == "masked_image" for g in negs]))
    return loss, metrics
