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

from caig_ray.losses import dpo_pcpo_loss, pcpo_kind_parts, sequence_logps
from caig_ray.pcpo import pcpo_negative
from caig_ray.rows import PreferenceExample


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


def response_ids(processor, response) -> list[int]:
    """A response's token ids: sampled ids are used as they are (DPO trains on what the policy
    sampled, CAIG); text (pretraining targets, tests) is tokenised and closed with the end-of-turn token."""
    if not isinstance(response, str):
        return [int(t) for t in response]
    tok = processor.tokenizer
    return tok(response + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]


def _over_response(key: str, ids: list[int]) -> list[int]:
    """A per-token tensor's values over the response: the ids themselves, 1 for the attention mask, 0 else."""
    return ids if key == "input_ids" else [1 if key == "attention_mask" else 0] * len(ids)


def build_batch(processor, images: list[Image.Image], instructions: list[str], responses: list) -> dict:
    """Prompt (chat template + image, as the processor encodes it) followed by each response's ids
    (``response_ids``: sampled token ids, or text), padded on the tokenizer's side, with
    ``response_mask`` (1 on response tokens, 0 on prompt and padding). Every per-token tensor the
    processor returns (e.g. Qwen's ``mm_token_type_ids``) is extended with 0 over the response."""
    tok = processor.tokenizer
    prompts = [_prompt(processor, ins) for ins in instructions]
    enc = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    keep = enc["attention_mask"].bool()
    resp = [response_ids(processor, r) for r in responses]
    lengths = [int(keep[i].sum()) + len(r) for i, r in enumerate(resp)]
    width, left = max(lengths), tok.padding_side == "left"
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    per_token = [k for k, v in enc.items() if torch.is_tensor(v) and v.shape[:2] == keep.shape]

    def row(values: list[int], fill: int, n: int) -> list[int]:
        return [fill] * (width - n) + values if left else values + [fill] * (width - n)

    out = {k: v for k, v in enc.items() if k not in per_token}
    for k in per_token:
        fill = pad_id if k == "input_ids" else 0
        out[k] = torch.tensor([row(enc[k][i][keep[i]].tolist() + _over_response(k, r), fill, lengths[i])
                               for i, r in enumerate(resp)], dtype=enc[k].dtype)
    out["response_mask"] = torch.tensor([row([0] * int(keep[i].sum()) + [1] * len(r), 0, lengths[i])
                                         for i, r in enumerate(resp)], dtype=torch.long)
    return type(enc)(out)


def response_logps(model, batch: dict) -> torch.Tensor:
    """Summed log π(response | image, instruction) per row, computed only where it is needed: the
    model returns logits for the last positions that predict response tokens (``logits_to_keep``),
    and TRL's ``selective_log_softmax`` gathers each token's log-prob without a full-vocabulary fp32
    tensor for every position (docs/models.md, memory per GPU: 384 MB for one 3,000-token LLaVA-NeXT sequence)."""
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
    """``n`` sampled descriptions per product (T = ``temperature``, top-p off, one beam): their text
    (``descriptions``, what the renderer gets after cleaning), their token ids (``token_ids``, what DPO
    trains on) and which repeat an earlier sample (``duplicate``)."""
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
    new = out[:, enc["input_ids"].shape[1]:]
    texts = processor.batch_decode(new, skip_special_tokens=True)
    ids = [_until_eos(seq.tolist(), tok.eos_token_id) for seq in new]
    results = []
    for i in range(len(instructions)):
        mine = [t.strip() for t in texts[i * n:(i + 1) * n]]
        results.append({"descriptions": mine, "token_ids": ids[i * n:(i + 1) * n],
                        "duplicate": [t in mine[:k] for k, t in enumerate(mine)]})
    return results


def _until_eos(ids: list[int], eos: int) -> list[int]:
    """A sampled sequence up to and with its first end-of-turn token (what follows is padding); one
    that hit max_new_tokens has none."""
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def preference_rows(examples: list[PreferenceExample], image_size: int | None, pcpo_weight: float) -> list[dict]:
    """One row per example: its image, instruction, chosen and rejected description and -- drawn over
    the whole list, so that micro-batching never changes it -- its PCPO negative. Each example's
    ``image`` (bytes or PIL) is loaded (``image_ref``) by the caller; ``seed`` draws its coin flip and
    mask; ``chosen_ids`` / ``rejected_ids``, when given, are trained on instead of the text."""
    native = [as_image(e.image) for e in examples]  # as stored: PCPO's mask is cut at this size
    images = [im.resize((image_size, image_size)) if image_size else im for im in native]
    ins = [e.instruction for e in examples]
    # the sampled token ids when the example has them (the online loop), else the text
    chosen = [e.chosen if e.chosen_ids is None else e.chosen_ids for e in examples]
    rows = []
    for i, e in enumerate(examples):
        rejected = e.rejected if e.rejected_ids is None else e.rejected_ids
        row = {"image": images[i], "instruction": ins[i], "chosen": chosen[i], "rejected": rejected}
        if pcpo_weight > 0:
            row["negative"] = pcpo_negative(i, images, ins, chosen, np.random.default_rng(int(e.seed)),
                                            native=native, size=image_size)
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
        metrics.update(pcpo_kind_parts(pcpo, [r["negative"]["kind"] for r in rows], beta))
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
