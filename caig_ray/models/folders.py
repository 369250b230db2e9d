"""``check_model_folder``: a model folder refused up front -- before Ray or any worker starts -- naming
the setting, the path and what is missing. Reads a few KB (the listing, ``config.json``, the
safetensors headers) and imports no model stack, so a driver checks every folder in well under a
second (``caig_ray.models.vlm``, which loads the models, imports transformers: ~5 s)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from caig_ray.errors import ModelFolderError

SUPPORTED_FAMILIES = ("llava_next", "qwen2_vl", "qwen2_5_vl")


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
        opened = open(self.folder / name, "rb") if not self.remote else self.fs.open_input_file(f"{self.root}/{name}")
        with opened as f:
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
