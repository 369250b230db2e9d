#!/usr/bin/env bash
# Set up caig-ray in ./.venv on a fresh CPU machine (idempotent: a second run is quick).
# torch is pinned to the 2.13.0 CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
# On a GPU cluster install your CUDA torch first and run: pip install -c constraints.txt -e .
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.caig-ray-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then
  echo "setup: .venv is up to date"; exit 0
fi
start=$(date +%s)
.venv/bin/pip install -q --disable-pip-version-check -U pip 2>&1 | grep -v "^WARNING: Location" || true
# --no-compile, then one parallel compileall below: pip byte-compiles on one core (~70 s of setup's ~130 s
# on a 2-core machine); the same files compiled on every core take ~40 s (bash scripts/setup.sh prints it)
.venv/bin/pip install -q --no-compile --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
# constraints.txt: the exact versions CI ran with (torch aside), so a fresh machine gets the same
.venv/bin/pip install -q --no-compile --disable-pip-version-check -c constraints.txt -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# (a few files some packages ship are not Python 3 -- pip skips them in its own compile step; so does this)
compile_start=$(date +%s)
.venv/bin/python -m compileall -qq -j 0 .venv/lib/python*/site-packages >/dev/null 2>&1 || true
echo "setup: byte-compiled the environment in $(( $(date +%s) - compile_start )) s"
.venv/bin/python -c "import torch, ray, deepspeed, transformers, diffusers, trl, caig_ray, cv2; print('setup: torch', torch.__version__, '| ray', ray.__version__)"
touch "$stamp"
echo "setup: done in $(( $(date +%s) - start )) s"
