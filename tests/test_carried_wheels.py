"""The wheels scripts/gpu_check.sh carries to the lent GPU machine (which has no package index) are a
closed set on top of that machine's image (scripts/gpu_image_packages.txt): every requirement of a
carried package, for the machine's Python 3.12, is carried or in the image. A missing one fails only
there, at import (importlib_metadata 10 needing lazy-importer was found that way, on a rehearsal).
The carried packages' metadata is read from this environment, which constraints.txt pins to the same
versions."""

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}


def carried() -> dict[str, str]:
    """name -> version of every wheel gpu_check.sh --fetch-wheels puts in .whl/ (and deepspeed's)."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    listed = re.search(r"^WHEELS=\((.*?)\)", script, re.M | re.S).group(1).split()
    listed += re.findall(r"pip wheel .* (deepspeed==\S+)", script)
    pins = dict(p.split("==") for p in listed)
    return {canonicalize_name(n): v for n, v in pins.items()}


def image() -> set[str]:
    lines = (ROOT / "scripts" / "gpu_image_packages.txt").read_text().splitlines()
    return {canonicalize_name(x.strip()) for x in lines if x.strip() and not x.startswith("#")}


def test_every_requirement_of_a_carried_wheel_is_carried_or_in_the_gpu_image():
    wheels, held = carried(), image()
    assert {"ray", "deepspeed", "diffusers", "trl", "pydantic"} <= wheels.keys()
    assert not wheels.keys() & held, "carried though the image holds it (the image's own is used)"
    missing, wrong = [], []
    for name, version in wheels.items():
        dist = metadata.distribution(name)
        assert dist.version == version, f"gpu_check.sh carries {name}=={version}, constraints.txt pins {dist.version}"
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(GPU_PYTHON):
                continue
            dep = canonicalize_name(req.name)
            if dep in wheels:
                if not req.specifier.contains(wheels[dep], prereleases=True):
                    wrong.append(f"{name} needs {line}, carried {dep}=={wheels[dep]}")
            elif dep not in held:
                missing.append(f"{name} needs {line}")
    assert not missing, "not carried and not in the GPU image: " + "; ".join(missing)
    assert not wrong, "; ".join(wrong)
