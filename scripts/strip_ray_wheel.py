"""Rewrite a Ray wheel without what a GPU check never loads, so it travels inside the device machine's
64 MiB (scripts/gpu_check.sh --fetch-wheels): Java (``ray/jars``), RLlib, Ray's LLM library and the
dashboard's browser client (the check starts Ray with ``include_dashboard=False``). Every other file
and the wheel's metadata stay as they are; RECORD drops the removed files' lines, so pip installs the
result like the original.

    python scripts/strip_ray_wheel.py IN.whl OUT_DIR      # writes OUT_DIR/<the same file name>
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

DROPPED = ("ray/jars/", "ray/rllib/", "ray/llm/", "ray/dashboard/client/")


def strip(wheel: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / wheel.name
    if out.resolve() == wheel.resolve():
        raise SystemExit(f"strip_ray_wheel: OUT_DIR must differ from the wheel's folder ({wheel.parent})")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if info.filename.startswith(DROPPED):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(x for x in lines if not x.startswith(DROPPED)).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    wheel = Path(sys.argv[1])
    out = strip(wheel, Path(sys.argv[2]))
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB (from {wheel.stat().st_size / 2**20:.1f} MiB)")
