#!/usr/bin/env bash
# GPU check: the tests marked `gpu` (tests/test_gpu.py) on a CUDA machine -- the real-architecture tiny
# models (LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) as a DeepSpeed ZeRO-3 policy over NCCL in bf16, the RM in
# bf16, the renderer in fp16 (tiny, and SD1.5-size with random weights for time). Writes
# bench/results/gpu_check.json with the card's name (and a copy under $OUT when set).
#
# On the project's lent GPU machine (no package index there), carry the wheels in .whl/ made by
#   bash scripts/gpu_check.sh --fetch-wheels        (here, with network)
# and run:  bash scripts/gpu_check.sh
# On a cluster node with the project installed (pip install -e ".[test]"), just run it.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
        diffusers==0.42.1 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0
        accelerate==1.15.0)
if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  # deepspeed ships as an sdist only: build its pure-Python wheel (ops are JIT-built where needed)
  python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
  du -sh .whl; exit 0
fi
start=$(date +%s)
PY=python3
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/caig_site .whl/*.whl \
    || { echo "gpu_check: wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/caig_site:$PWD
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -m pytest -q -p no:cacheprovider --run-gpu -m gpu tests/test_gpu.py -o addopts="" --timeout 480 \
  -W ignore::DeprecationWarning
rc=$?
[ -n "${OUT:-}" ] && cp bench/results/gpu_check.json "$OUT/" 2>/dev/null
echo "gpu_check: pytest exited $rc after $(( $(date +%s) - start )) s"
exit $rc
