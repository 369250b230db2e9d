"""The config documents itself: every field has a description, ``docs/configuration.md`` is the schema
rendered (and fails here when stale), and no key exists that nothing reads. Fast: no Ray, no models."""

import functools
import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from caig_ray.config import CaigConfig
from caig_ray.config_docs import COMMAND, main, render

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
# where a key must be read: the package's code, outside the schema itself and its renderer
READERS = ("caig_ray", "actors", "dataplane", "jobs")
SCHEMA_FILES = {ROOT / "caig_ray" / "config.py", ROOT / "caig_ray" / "config_docs.py"}

# Leaf keys that no `.name` / "name" in the code names, because the code reads them generically
# (a block's model_dump handed on and read by key built at run time, a getattr over a name list).
# Each entry says where it is read; read the code before adding one. Empty: every key today is read by
# name (sd_path/controlnet_path go through getattr but their names are string literals there).
READ_GENERICALLY: dict[str, str] = {}


def _models(model: type[BaseModel], seen: dict | None = None) -> dict[str, type[BaseModel]]:
    """Every model reachable from ``model`` through its fields' annotations (Optional, lists... too)."""
    seen = {} if seen is None else seen
    if model.__name__ in seen:
        return seen
    seen[model.__name__] = model
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            ann = stack.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                _models(ann, seen)
            stack += typing.get_args(ann)
    return seen


def _leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(key path, attribute name) of every leaf key, blocks walked."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaves(ann, f"{prefix}{name}.")
        else:
            out.append((prefix + name, name))
    return out


def test_configuration_md_is_the_schema_rendered():
    assert DOC.is_file(), f"docs/configuration.md is missing: generate it with `{COMMAND}`"
    assert DOC.read_text() == render(), (
        f"docs/configuration.md is stale (a field, a description or a preset changed): regenerate it with `{COMMAND}`")


def test_check_flag_tells_a_stale_file(tmp_path, capsys):
    assert main(["--check", str(DOC)]) == 0
    stale = tmp_path / "configuration.md"
    stale.write_text(render().replace("| `market.seed` |", "| `market.sed` |"))
    assert main(["--check", str(stale)]) == 1
    assert COMMAND in capsys.readouterr().err
    assert main(["--check", str(tmp_path / "missing.md")]) == 1


def test_render_covers_every_key_and_preset():
    text = render()
    for path, _ in _leaves(CaigConfig):
        assert f"| `{path}` |" in text, path
    for preset in ("quick", "demo", "gpu-cluster"):
        assert f"### {preset}\n" in text
    assert "base: gpu-cluster" in text and "base: none" in text and "config show" in text and "--diff" in text


def test_every_field_of_every_model_has_a_description():
    models = _models(CaigConfig)
    for expected in ("Placement", "WorkerGroupPlacement", "ActorPoolConfig", "ReplicaPlacement",
                     "TinyBackboneConfig", "LoraConfig", "FaultConfig"):
        assert expected in models, expected
    missing = [f"{m}.{f}" for m, model in models.items() for f, info in model.model_fields.items()
               if not (info.description or "").strip()]
    assert not missing, f"fields without a description (an attribute docstring under the field): {missing}"
    # and pydantic puts them in the JSON schema (what docs/configuration.md is rendered from)
    schema = CaigConfig.model_json_schema()
    for name, definition in [("CaigConfig", schema), *schema["$defs"].items()]:
        for prop, spec in definition.get("properties", {}).items():
            assert spec.get("description", "").strip(), f"{name}.{prop} has no description in the JSON schema"


@functools.lru_cache(maxsize=1)
def _reader_text() -> str:
    files = [p for d in READERS for p in sorted((ROOT / d).rglob("*.py")) if p not in SCHEMA_FILES]
    assert files, "no reader files found"
    return "\n".join(p.read_text() for p in files)


AUDITED = [(p, n) for p, n in _leaves(CaigConfig) if p not in READ_GENERICALLY]  # the allow-list is checked below


@pytest.mark.parametrize("path,name", AUDITED, ids=[p for p, _ in AUDITED])
def test_no_key_exists_that_nothing_reads(path, name):
    """A grep-style audit: the key's attribute name is read somewhere (``.name`` or ``"name"``) in
    caig_ray/, actors/ or jobs/ outside config.py. It cannot tell which block a common name (seed,
    lr, batch_size) belongs to; it does catch a key whose name nothing mentions at all."""
    pattern = re.compile(rf"\.{re.escape(name)}\b|[\"']{re.escape(name)}[\"']")
    assert pattern.search(_reader_text()), (
        f"config key {path}: nothing under {', '.join(READERS)}/ reads `{name}` (outside config.py): "
        "wire it where it belongs, or remove it (and from caig_ray/presets/*.yaml and the tests)")


def test_allow_list_is_current():
    leaves = dict(_leaves(CaigConfig))
    text = _reader_text()
    for path, where in READ_GENERICALLY.items():
        assert path in leaves, f"READ_GENERICALLY names {path}, which is no key"
        assert where.strip(), f"READ_GENERICALLY[{path!r}] must say where it is read"
        name = leaves[path]
        assert not re.search(rf"\.{re.escape(name)}\b|[\"']{re.escape(name)}[\"']", text), (
            f"{path} is now read by name: drop it from READ_GENERICALLY")
