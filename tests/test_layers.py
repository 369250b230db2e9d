"""The layer rule of docs/architecture.md, checked on the source: nothing imports upwards
(``jobs -> dataplane -> actors -> caig_ray``) and the runtime never imports the test-fixture factories
(``caig_ray.testing``). Every import counts, module-level or inside a function."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the caig_ray subpackages it must not import
FORBIDDEN = {
    "caig_ray": ("caig_ray.actors", "caig_ray.dataplane", "caig_ray.jobs", "caig_ray.testing"),
    "actors": ("caig_ray.dataplane", "caig_ray.jobs", "caig_ray.testing"),
    "dataplane": ("caig_ray.jobs", "caig_ray.testing"),
    "jobs": ("caig_ray.testing",),
}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno
            yield from ((f"{node.module}.{a.name}", node.lineno) for a in node.names)


def test_nothing_imports_upwards_and_the_runtime_never_imports_the_testing_factories():
    bad = []
    for top, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] == ("caig_ray", "testing"):
                continue  # the factories themselves (they may use the core)
            for name, line in _imports(path):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    bad.append(f"{rel}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The check above is not vacuous: an upward import in a file is found."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from caig_ray.jobs.train import train\n")
    assert ("caig_ray.jobs.train", 2) in list(_imports(f))


LIGHT = {  # module -> what importing it must not import
    "caig_ray.actors.renderer": ("torch", "transformers", "diffusers", "deepspeed"),
    "caig_ray.dataplane.stream": ("torch", "transformers", "diffusers", "deepspeed"),
    "caig_ray.dataplane.catalog": ("torch", "transformers", "diffusers", "deepspeed"),
    "caig_ray.models.folders": ("torch", "transformers", "diffusers", "deepspeed"),
    "caig_ray.actors.scorer": ("transformers", "diffusers", "deepspeed"),
}


@pytest.mark.parametrize("module", sorted(LIGHT))
def test_modules_a_process_imports_without_using_a_model_stack_import_none(module):
    """The procedural renderer's actors, the feed's actor and read tasks (dataplane/stream.py) and the
    catalog's validation tasks start a Ray worker each; every job's driver checks model folders
    (models/folders.py) and imports the scorer's class to build its pool: importing torch and
    transformers there costs ~5 s of CPU a process (measured with ``python -X importtime``), for
    nothing they use."""
    heavy = LIGHT[module]
    code = f"import sys, {module}\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]", (module, res.stdout[-300:])
