"""``docs/configuration.md``, generated from the config schema (``caig_ray.config``).

    python -m caig_ray.config_docs > docs/configuration.md     # regenerate
    python -m caig_ray.config_docs --check docs/configuration.md  # exit 1 when it is stale

Every key of every block gets a row (key path, type with its bounds, default, description); the
descriptions are the fields' attribute docstrings in ``caig_ray/config.py``. The presets' own keys
come from ``caig_ray/presets/*.yaml``. Nothing here depends on the machine or the time: the output
is a pure function of the schema and the preset files, so a test can compare it with the file.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from caig_ray.config import PRESETS, CaigConfig, preset_path

COMMAND = "python -m caig_ray.config_docs > docs/configuration.md"

LAYERING = """\
## How a config layers on a preset

A preset is one layer on the field defaults. Your own config file names its base on its first line
-- `base: gpu-cluster` (a preset), another YAML file (relative to this one) or `base: none` (the field
defaults below) -- and holds only the keys that differ from it. Blocks (`policy:`, `resources.renderers:`,
...) merge key by key; any other value -- a list, or a table such as `market.category_bias` -- replaces
the base's value whole, so a layer can drop an entry. `--preset NAME` is the base of a file that names
none (a file whose `base:` says otherwise is refused); command-line flags are merged on top of it all.
`caig-ray config show --config FILE --diff` prints just the layer -- what differs from the base preset, under
a `base:` line; `caig-ray config show --preset gpu-cluster --diff > my.yaml` starts a file to edit.

```yaml
base: gpu-cluster
policy:
  model_path: /models/my-pm
resources:
  policy: {num_workers: 4}
```
"""


def _block(ann: Any) -> type[BaseModel] | None:
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _value(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False)


def _type(ann: Any) -> str:
    if ann is type(None):
        return "null"
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " | ".join(_value(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type(a) for a in args)}]"
    return ann.__name__ if isinstance(ann, type) else str(ann)


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _bounds(field: FieldInfo) -> str:
    out = []
    for m in field.metadata:
        for attr, sign in _BOUNDS:
            if getattr(m, attr, None) is not None:
                out.append(f"{sign} {getattr(m, attr)}")
    return ", ".join(out)


def _type_cell(field: FieldInfo) -> str:
    bounds = _bounds(field)
    return f"`{_cell(_type(field.annotation))}`" + (f" ({bounds})" if bounds else "")


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    lines += [f"| `{k}` | {t} | `{_cell(d)}` | {_cell(desc)} |" for k, t, d, desc in rows]
    return lines


def _sections(model: type[BaseModel], defaults: dict, prefix: str, level: int, intro: str) -> list[str]:
    """One section per block: its leaf keys in a table, then its nested blocks (depth first).
    ``defaults`` are the block's values in ``CaigConfig()``: a nested block's default is its parent's
    (``resources.renderers.max_size`` is 2, not ``ActorPoolConfig``'s 1)."""
    rows, nested = [], []
    for name, field in model.model_fields.items():
        sub = _block(field.annotation)
        if sub:
            nested.append((name, field, sub))
        else:
            rows.append((prefix + name, _type_cell(field), _value(defaults[name]), _one_line(field.description)))
    title = prefix.rstrip(".") or "top level"
    out = [f"{'#' * level} {title}", ""]
    if intro:
        out += [intro, ""]
    if rows:
        out += _table(rows) + [""]
    if nested:
        out += ["Blocks: " + ", ".join(f"`{prefix}{n}`" for n, _, _ in nested) + ".", ""]
    for name, field, sub in nested:
        # a top-level block: its class says what it is; a nested one: what it is for, then its class
        own = _one_line(sub.__doc__)
        words = own if not prefix else " ".join(w for w in (_one_line(field.description), own) if w)
        # the top level's blocks are sections of their own; a block's blocks are its subsections
        out += _sections(sub, defaults[name], f"{prefix}{name}.", level + 1 if prefix else level, words)
    return out


def _flatten(model: type[BaseModel], raw: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(key path, value) of what a YAML layer sets, split into blocks as the schema reads them."""
    out = []
    for k, v in raw.items():
        field = model.model_fields.get(k)
        sub = _block(field.annotation) if field else None
        if sub and isinstance(v, dict):
            out += _flatten(sub, v, f"{prefix}{k}.")
        else:
            out.append((prefix + k, v))
    return out


def _default_at(path: str) -> Any:
    value: Any = CaigConfig().model_dump(mode="json")
    for part in path.split("."):
        value = value[part]
    return value


def _preset_section(name: str) -> list[str]:
    path = preset_path(name)
    text = path.read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    raw = yaml.safe_load(text) or {}
    base = raw.pop("base", None)  # a control world: the keys it sets on another preset
    out = [f"### {name}", "", f"`caig_ray/presets/{path.name}`" + (":" if header else "."), ""]
    if header:
        out += ["> " + _one_line(" ".join(header)), ""]
    if base:
        out += [f"On preset `{base}`: every key of `{base}` and these.", ""]
    out += ["| key | preset value | field default |", "| --- | --- | --- |"]
    for key, value in _flatten(CaigConfig, raw):
        out.append(f"| `{key}` | `{_cell(_value(value))}` | `{_cell(_value(_default_at(key)))}` |")
    return out + [""]


def render() -> str:
    """The whole of ``docs/configuration.md``."""
    out = [
        "# Configuration",
        "",
        f"<!-- Generated from the schema in caig_ray/config.py by `{COMMAND}`; do not edit by hand. -->",
        "",
        f"This file is generated by `{COMMAND}` from the field descriptions in `caig_ray/config.py`",
        "and the presets in `caig_ray/presets/`; `tests/test_config_docs.py` fails when it is stale.",
        "Every block forbids unknown keys: a typo fails with the key path and the file named.",
        "`caig-ray config show --preset NAME` (or `--config FILE`) prints a config resolved, with every default.",
        "",
        LAYERING,
        "## Presets",
        "",
        "The keys each preset sets; every other key keeps its field default (the tables under *Keys*).",
        "",
    ]
    for name in PRESETS:
        out += _preset_section(name)
    out += ["## Keys", ""]
    out += _sections(CaigConfig, CaigConfig().model_dump(mode="json"), "", 3, _one_line(CaigConfig.__doc__))
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m caig_ray.config_docs",
                                description="Print docs/configuration.md, generated from the config schema.")
    p.add_argument("--check", metavar="PATH", default=None,
                   help="compare PATH with the generated text instead; exit 1 when it differs")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    text = render()
    if args.check is None:
        sys.stdout.write(text)
        return 0
    path = Path(args.check)
    current = path.read_text() if path.is_file() else None
    if current != text:
        why = "does not exist" if current is None else "is stale (the config schema or a preset changed)"
        print(f"{path} {why}: regenerate it with `{COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
