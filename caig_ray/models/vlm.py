"""The multimodal LLM backbone shared by the prompt model and the reward model.

Real checkpoints (Qwen2-VL / Qwen2.5-VL, LLaVA-NeXT) load from local folders with
``from_pretrained``; the tiny default is the same Qwen2-VL class built from a small config with
random weights and a locally trained tokenizer, saved to a folder, then loaded by the same code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoProcessor, Qwen2VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from caig_ray.config import TinyBackboneConfig
from caig_ray.models.tokenizers import build_vlm_tokenizer

QWEN_FAMILY = ("qwen2_vl", "qwen2_5_vl")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CaigVLProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without a video processor: transformers 5's video processors import
    torchvision, which does not load beside the CPU torch wheel. Images use the PIL processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


def tiny_vlm_config(tiny: TinyBackboneConfig, tokenizer) -> Qwen2VLConfig:
    head_dim = tiny.hidden_size // tiny.num_heads
    half = head_dim // 2  # mrope_section must sum to head_dim / 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>")}
    return Qwen2VLConfig(
        text_config=dict(
            hidden_size=tiny.hidden_size, num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_heads,
            num_key_value_heads=tiny.num_kv_heads, intermediate_size=tiny.intermediate_size,
            vocab_size=len(tokenizer), max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
            bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=tiny.vision_depth, embed_dim=tiny.vision_embed_dim, hidden_size=tiny.hidden_size,
            num_heads=2, mlp_ratio=2, patch_size=tiny.vision_patch_size, spatial_merge_size=2,
            in_channels=3, temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_processor(tiny: TinyBackboneConfig, max_pixels: int, corpus: list[str]) -> CaigVLProcessor:
    """The tiny backbone's processor; its tokenizer is trained on ``corpus`` (the world's text)."""
    tokenizer = build_vlm_tokenizer(corpus, tiny.vocab_size)
    unit = tiny.vision_patch_size * 2
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=unit * unit, max_pixels=max_pixels, patch_size=tiny.vision_patch_size, merge_size=2,
    )
    return CaigVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def model_type(path: str | Path) -> str:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"no config.json in model folder {path}: not a saved model")
    return json.loads(cfg.read_text()).get("model_type", "")


def load_processor(path: str | Path):
    """The processor saved beside a model. Qwen-VL folders load with ``CaigVLProcessor`` itself
    (``AutoProcessor`` would return only the tokenizer for it); others through ``AutoProcessor``."""
    if model_type(path) in QWEN_FAMILY or model_type(path) == "caig_reward":
        return CaigVLProcessor.from_pretrained(str(path))
    return AutoProcessor.from_pretrained(str(path))


SUPPORTED_FAMILIES = ("llava_next", "qwen2_vl", "qwen2_5_vl")


from caig_ray.errors import ModelFolderError  # noqa: E402  (re-exported: defined where importing it is light)


class _FolderView:
    """The reads ``check_model_folder`` makes -- which files exist, a JSON file, the tensor names of the
    safetensors weights -- on a local folder, or on an object-store folder without downloading it
    (a 7B checkpoint checked by a driver on a small head node reads a few KB of it)."""

    def __init__(self, location: str | Path):
        from caig_ray.storage import is_uri

        self.location = str(location)
        self.remote = is_uri(self.location)
        if self.remote:
            import pyarrow.fs as pafs

            self.fs, self.root = pafs.FileSystem.from_uri(self.location)
            info = self.fs.get_file_info(self.root)
            self.files = set()
            if info.type == pafs.FileType.Directory:
                for e in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False)):
                    self.files.add(e.path.rsplit("/", 1)[-1])
            self.exists = info.type == pafs.FileType.Directory
        else:
            self.folder = Path(location)
            self.exists = self.folder.is_dir()
            self.files = {p.name for p in self.folder.iterdir()} if self.exists else set()

    def has(self, name: str) -> bool:
        return name in self.files

    def read_json(self, name: str) -> dict:
        if not self.remote:
            return json.loads((self.folder / name).read_text())
        with self.fs.open_input_file(f"{self.root}/{name}") as f:
            return json.loads(f.read().decode())

    def safetensors_keys(self, name: str) -> set[str]:
        """The tensor names in a safetensors file's header (its first 8 bytes give the header's length)."""
        if not self.remote:
            from safetensors import safe_open

            with safe_open(str(self.folder / name), "pt") as st:
                return set(st.keys())
        import struct

        with self.fs.open_input_file(f"{self.root}/{name}") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return set(json.loads(f.read(n).decode())) - {"__metadata__"}


def _weight_names(view: _FolderView) -> set[str] | None:
    """Tensor names of a folder's safetensors weights (None when it holds only other formats)."""
    if view.has("model.safetensors.index.json"):
        return set(view.read_json("model.safetensors.index.json").get("weight_map", {}))
    files = sorted(f for f in view.files if f.endswith(".safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for f in files:
        names |= view.safetensors_keys(f)
    return names


def check_model_folder(path: str | Path | None, setting: str, kind: str = "policy") -> str:
    """Refuse a model folder up front -- before Ray or any worker starts -- naming ``setting`` (the
    flag or config key), the path and what is missing. ``kind``: "policy" / "backbone" (a generation
    checkpoint of a supported family) or "reward" (a trained RM: both heads present). An object-store
    folder is checked where it is stored (listing, config, weight headers), not downloaded. Returns the
    folder's model_type."""
    if path is None:
        raise ModelFolderError(f"{setting}: no model folder given")
    try:
        view = _FolderView(path)
    except (ValueError, OSError) as e:  # a URI pyarrow cannot open (ArrowInvalid is a ValueError)
        raise ModelFolderError(f"{setting}: model {path}: not a location pyarrow.fs can read: {e}") from None
    shown = view.location if view.remote else Path(path)
    if not view.exists:
        raise ModelFolderError(f"{setting}: model folder not found: {shown}")
    if not view.has("config.json"):
        raise ModelFolderError(f"{setting}: {shown} has no config.json: not a saved model "
                               f"(expected a folder written by save_pretrained, as the hub repos are)")
    mtype = view.read_json("config.json").get("model_type", "")
    supported = SUPPORTED_FAMILIES
    if mtype not in supported:
        raise ModelFolderError(f"{setting}: {shown} holds a {mtype or 'unknown'!r} model; "
                               f"supported families: {', '.join(supported)}")
    missing = []
    names = _weight_names(view)
    if names is None and not any(f.startswith("pytorch_model") and f.endswith(".bin") for f in view.files):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any(view.has(f) for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        missing.append("a tokenizer (tokenizer.json / tokenizer.model)")
    if not any(view.has(f) for f in ("preprocessor_config.json", "processor_config.json")):
        missing.append("an image processor (preprocessor_config.json)")
    if missing:
        raise ModelFolderError(f"{setting}: {shown} is missing {'; '.join(missing)}")
    if kind == "reward" and names is not None and not {"score.weight", "ctr_head.weight"} <= names:
        raise ModelFolderError(f"{setting}: {shown} is a {mtype} checkpoint but not a trained reward model "
                               f"(no score/ctr_head weights): pass the folder `caig-ray train-rm --out` wrote")
    return mtype
