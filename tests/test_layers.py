"""The layer rule of docs/architecture.md, checked on the source: nothing imports upwards
(``jobs -> dataplane -> actors -> caig_ray``) and the runtime never imports the test-fixture factories
(``caig_ray.testing``). Every import counts, module-level or inside a function."""

import ast
from pathlib import Path

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
