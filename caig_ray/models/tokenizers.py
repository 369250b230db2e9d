"""Tokenizers trained here, in milliseconds, on the market's own text (no hub download)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
"""Qwen2-VL's special tokens in its tokenizer's order (the hub-layout test families use them all)."""
TINY_QWEN_SPECIAL = [t for t in QWEN_SPECIAL if t not in {"<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                                                          "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_pad|>"}]
"""The ones the tiny backbone's chat template and processor use (grounding tokens left out), same order."""


def build_vlm_tokenizer(corpus: list[str], vocab_size: int):
    """A ByteLevel BPE with the Qwen special tokens, as a ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=TINY_QWEN_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=TINY_QWEN_SPECIAL[1:], padding_side="left",
    )


def build_clip_tokenizer(corpus: list[str], vocab_size: int):
    """A CLIP BPE tokenizer (end-of-word suffix ``</w>``) for the tiny Stable Diffusion."""
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    with tempfile.TemporaryDirectory() as d:
        bpe.model.save(d)
        vocab = json.loads((Path(d) / "vocab.json").read_text())
        merges = [tuple(line.split(" ")) for line in (Path(d) / "merges.txt").read_text().splitlines()
                  if line and not line.startswith("#")]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
