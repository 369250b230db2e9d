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
    """Summed log π(response | image, instruction) per row, computed only where it is needed: the
    model returns logits for the last positions that predict response tokens (``logits_to_keep``),
    and TRL's ``selective_log_softmax`` gathers each token's log-prob without a full-vocabulary fp32
    tensor for every position (DESIGN.md 8.2: 384 MB for one 3,000-token LLaVA-NeXT sequence)."""
    from trl.trainer.utils import selective_log_softmax

    inputs = {k: v for k, v in batch.items() if k != "response_mask"}
    mask = batch["response_mask"]
    width = mask.shape[1]
    first = int(mask.float().argmax(dim=1)[mask.any(dim=1)].min()) if mask.any() else width - 1
    keep = width - first + 1  # logits at positions first-1 .. width-1 predict tokens first .. width
    logits = model(**inputs, logits_to_keep=keep).logits[:, :-1]
    ids, used = batch["input_ids"][:, first:], mask[:, first:]
    tok = selective_log_softmax(logits if logits.dtype != torch.float16 else logits.float(), ids)
    return (tok.float() * used.to(torch.float32)).sum(dim=1)


def full_response_logps(model, batch: dict) -> torch.Tensor:
    """The reference computation: log-softmax over the full vocabulary at every position (kept for
    the equivalence test of ``response_logps``)."""
    inputs = {k: v for k, v in batch.items() if k != "response_mask"}
    return sequence_logps(model(**inputs).logits, batch["input_ids"], batch["response_mask"])


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


def preference_rows(examples: list[dict], image_size: int | None, pcpo_weight: float) -> list[dict]:
    """One row per example: its image, instruction, chosen and rejected description and -- drawn over
    the whole list, so that micro-batching never changes it -- its PCPO negative. Each example:
    ``image`` (bytes or PIL), ``instruction``, ``chosen``, ``rejected``, ``seed`` (its coin flip and mask)."""
    images = [as_image(e["image"], image_size) for e in examples]
    ins = [e["instruction"] for e in examples]
    chosen = [e["chosen"] for e in examples]
    rows = []
    for i, e in enumerate(examples):
        row = {"image": images[i], "instruction": ins[i], "chosen": chosen[i], "rejected": e["rejected"]}
        if pcpo_weight > 0:
            row["negative"] = pcpo_negative(i, images, ins, chosen, np.random.default_rng(int(e["seed"])))
        rows.append(row)
    return rows


def preference_loss_on_rows(model, reference, processor, rows: list[dict], beta: float, pcpo_weight: float,
                            device: str = "cpu") -> tuple[torch.Tensor, dict]:
    """DPO + w·PCPO loss (mean over ``rows``) and its metrics. ``reference`` is the frozen reference
    model, or None for a LoRA policy: then the reference is the same model with its adapter disabled."""
    n = len(rows)
    rows_img = [r["image"] for r in rows] * 2
    rows_ins = [r["instruction"] for r in rows] * 2
    rows_resp = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    if pcpo_weight > 0:
        rows_img += [r["negative"]["image"] for r in rows]
        rows_ins += [r["negative"]["instruction"] for r in rows]
        rows_resp += [r["negative"]["response"] for r in rows]
    with left_padded(processor):  # responses end every row: the fewest logits to keep
        batch = build_batch(processor, rows_img, rows_ins, rows_resp).to(device)
    pi = response_logps(model, batch)
    with torch.no_grad():
        if reference is not None:
            ref = response_logps(reference, batch)
        else:
            peft_model = getattr(model, "module", model)  # a DeepSpeed engine wraps the PeftModel
            with peft_model.disable_adapter():
                ref = response_logps(model, batch)
    dpo = (pi[:n], pi[n:2 * n], ref[:n], ref[n:2 * n])
    pcpo = (pi[:n], pi[2 * n:], ref[:n], ref[2 * n:]) if pcpo_weight > 0 else None
    loss, metrics = dpo_pcpo_loss(dpo, pcpo, beta, pcpo_weight)
    if pcpo_weight > 0:
        metrics["pcpo/masked_image_share"] = float(np.mean([r["negative"]["kind"] == "masked_image" for r in rows]))
    return loss, metrics


def micro_batches(rows: list, size: int | None, count: int | None = None) -> list[tuple[list, float]]:
    """(rows, weight) chunks of at most ``size`` rows whose weighted losses sum to the whole list's
    mean loss (weight = len(chunk) / len(rows)). ``count`` pads with zero-weight chunks so that every
    rank runs the same number of forwards (ZeRO-3 gathers parameters in every forward)."""
    size = size or len(rows)
    chunks = [(rows[i:i + size], len(rows[i:i + size]) / len(rows)) for i in range(0, len(rows), size)]
    if count is not None:
        if count < len(chunks):
            raise ValueError(f"{len(rows)} rows need {len(chunks)} micro-batches of {size}, more than {count}")
        chunks += [(rows[:1], 0.0)] * (count - len(chunks))
    return chunks


def dpo_pcpo_step_loss(model, ref_model, processor, examples: list[dict], beta: float, pcpo_weight: float,
                       image_size: int | None, device: str = "cpu") -> tuple[torch.Tensor, dict]:
    """Loss of one batch in one forward (see ``preference_rows`` for an example's keys)."""
    rows = preference_rows(examples, image_size, pcpo_weight)
    return preference_loss_on_rows(model, ref_model, processor, rows, beta, pcpo_weight, device)
