"""The reward model (RM): the MLLM backbone, a 2-way ``score`` head on the last token (which ad,
left or right, gets more clicks) and a point-level ``ctr_head`` regressing [ctr_left, ctr_right].

transformers has no sequence-classification class for the VLM families, so this builds one on
top of each family's ``*PreTrainedModel`` (so ``save_pretrained``/``from_pretrained`` are the
library's own). Loading a generation checkpoint as an RM keeps its backbone (``model.*``) and
initialises the two heads -- the same thing ``AutoModelForSequenceClassification`` does.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping,
)
from transformers.utils import ModelOutput

from caig_ray.config import TinyBackboneConfig
from caig_ray.models.vlm import DTYPES, build_tiny_processor, load_processor, model_type, tiny_vlm_config

# model_type -> (module, PreTrainedModel base, backbone class, the key transformers registers the
# family's checkpoint conversion mapping under -- the hub's weight names -> the module's names. The
# key differs by family (a class name for Qwen-VL, the model_type for LLaVA-NeXT), so it is named
# here explicitly and a missing mapping is an error, never a silent random backbone.)
BACKBONES = {
    "qwen2_vl": ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLPreTrainedModel", "Qwen2VLModel",
                 "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLPreTrainedModel",
                   "Qwen2_5_VLModel", "Qwen2_5_VLForConditionalGeneration"),
    "llava_next": ("transformers.models.llava_next.modeling_llava_next", "LlavaNextPreTrainedModel",
                   "LlavaNextModel", "llava_next"),
}


@dataclass
class RewardOutput(ModelOutput):
    logits: torch.Tensor | None = None  # (B, 2): logit[0] >= logit[1] means "left gets more clicks"
    ctr: torch.Tensor | None = None  # (B, 2): predicted [ctr_left, ctr_right]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row, for left or right padding alike."""
    return attention_mask.shape[1] - 1 - attention_mask.flip(1).int().argmax(dim=1)


_CLASSES: dict[str, type] = {}


def reward_model_class(kind: str) -> type:
    """The RM class for a backbone family (built once, cached)."""
    if kind not in BACKBONES:
        raise ValueError(f"no reward-model support for model_type {kind!r}; supported: {sorted(BACKBONES)}")
    if kind in _CLASSES:
        return _CLASSES[kind]
    mod_name, base_name, backbone_name, mapping_key = BACKBONES[kind]
    module = importlib.import_module(mod_name)
    base, backbone_cls = getattr(module, base_name), getattr(module, backbone_name)

    def __init__(self, config):
        base.__init__(self, config)
        self.model = backbone_cls(config)
        hidden = config.get_text_config().hidden_size
        self.score = nn.Linear(hidden, 2, bias=False)
        self.ctr_head = nn.Linear(hidden, 2, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **inputs) -> RewardOutput:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **inputs)
        hidden = out.last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pooled = hidden[rows, last_token_index(attention_mask)]
        return RewardOutput(logits=self.score(pooled), ctr=self.ctr_head(pooled))

    cls = type(f"{backbone_cls.__name__}ForCaigReward", (base,), {
        "__init__": __init__, "forward": forward, "__module__": __name__,
        "_keys_to_ignore_on_load_unexpected": [r"lm_head\..*"],
    })
    # Read a generation checkpoint's (legacy) key layout exactly as its own class does: the family's
    # conversion mapping, looked up by model_type and registered for this class by name, so it never
    # depends on transformers finding it through a nested sub-model by chance.
    mapping = get_checkpoint_conversion_mapping(mapping_key)
    if not mapping:
        raise RuntimeError(f"transformers has no checkpoint conversion mapping under {mapping_key!r} for {kind}: "
                           f"a hub checkpoint's weights would not reach the reward model's backbone")
    register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)
    _CLASSES[kind] = cls
    return cls


def make_tiny_reward(tiny: TinyBackboneConfig, out_dir: str | Path, pair_image_size: int, corpus: list[str]) -> Path:
    """The tiny RM before training (random backbone and heads, a tokenizer trained on ``corpus``), saved
    for ``load_reward_model``."""
    processor = build_tiny_processor(tiny, max_pixels=2 * pair_image_size * pair_image_size, corpus=corpus)
    torch.manual_seed(tiny.seed)
    model = reward_model_class("qwen2_vl")(tiny_vlm_config(tiny, processor.tokenizer))
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def load_reward_model(path: str | Path, dtype: str = "float32", device: str = "cpu", from_backbone: bool = False):
    """(model, processor) from a local folder. A trained RM folder must hold both heads; with
    ``from_backbone=True`` a plain MLLM checkpoint is accepted and the heads are initialised. An
    object-store URI is read through this node's cache (``caig_ray.storage.local_model``)."""
    from caig_ray.storage import local_model

    path = local_model(path)
    cls = reward_model_class(model_type(path))
    model, info = cls.from_pretrained(str(path), dtype=DTYPES[dtype], output_loading_info=True)
    missing = [k for k in info["missing_keys"] if k.startswith(("score.", "ctr_head."))]
    if missing and not from_backbone:
        raise ValueError(f"{path} is not a trained reward model: it has no {missing} weights "
                         f"(pass from_backbone=True to start an RM from a plain MLLM checkpoint)")
    return model.to(device).eval(), load_processor(path)
