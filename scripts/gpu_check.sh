#!/usr/bin/env bash
# GPU check: the tests marked `gpu` (tests/test_gpu*.py) -- the real-architecture tiny models (LLaVA-NeXT,
# Qwen2-VL, Qwen2.5-VL) as a DeepSpeed ZeRO-3 policy over NCCL, the RM in bf16, the renderer in fp16
# (tiny, and SD1.5-size with random weights: plain vs accelerated), a 7B-size policy step, and the real
# path under Ray: one online round of the gpu-cluster pipeline on one card (fractional GPUs) and a Serve
# replica on the GPU answering HTTP. Writes bench/results/gpu_check.json with the card's name (and a
# copy under $OUT when set).
#
#   bash scripts/gpu_check.sh --fetch-wheels [--python 3.12]   # here, with network: .whl/ for the GPU machine
#   bash scripts/gpu_check.sh                                   # on the GPU machine (carry .whl/)
#   bash scripts/gpu_check.sh --device cpu                      # anywhere: the same tests on CPU, tiny (CI)
#   CAIG_PYTHON=PY bash scripts/gpu_check.sh --device cpu --wheels DIR   # as on the GPU machine: PY's packages
#                                                               # + the carried wheels (their python's tag)
#   bash scripts/gpu_check.sh -- -k "round or serve"           # a part (the rest goes to pytest)
#
# On a cluster node with the project installed (pip install -e ".[test]"), just run it.
set -uo pipefail
cd "$(dirname "$0")/.."
# what the GPU machine's image lacks (/work/.library/device/KINDS.md lists what it holds), pinned to
# constraints.txt's versions; transformers is the image's own (5.x): carrying ours would not fit in 64 MiB
# (fastapi imports opentelemetry-api, Serve grpcio-reflection; Serve runs without the rest of ray[serve]:
# checked with --wheels against a venv of the image's packages; importlib_metadata 10 imports lazy_importer)
WHEELS=(ray==2.60.0 hjson==3.1.0 diffusers==0.42.1 trl==1.16.0 datasets==5.2.0 dill==0.4.1
        multiprocess==0.70.19 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
        fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 opentelemetry-api==1.45.2 importlib_metadata==10.2.0
        grpcio-reflection==1.85.1 lazy-importer==0.1.0)
DEVICE=cuda
PYVER=3.12
PYTEST_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --fetch-wheels) FETCH=1 ;;
    --python) PYVER="$2"; shift ;;
    --device) DEVICE="$2"; shift ;;
    --wheels) WHEELDIR="$2"; shift ;;  # install these wheels first, as on the GPU machine (default there: .whl)
    --) shift; PYTEST_ARGS=("$@"); break ;;  # the rest goes to pytest, e.g. -- -k "round or serve"
    *) echo "gpu_check: unknown argument $1 (see the header of $0)"; exit 2 ;;
  esac
  shift
done
if [ -n "${FETCH:-}" ]; then
  mkdir -p .whl /tmp/caig_wheels
  tag=cp${PYVER/./}
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d /tmp/caig_wheels "${WHEELS[@]}" || exit 1
  # Ray's wheel (79 MB) without Java, RLlib, ray.llm and the dashboard's browser client
  python3 scripts/strip_ray_wheel.py /tmp/caig_wheels/ray-*-"$tag"-*.whl .whl || exit 1
  find /tmp/caig_wheels -name '*.whl' ! -name 'ray-*' -exec cp {} .whl/ \;
  # deepspeed ships as an sdist only: build its pure-Python wheel (ops are JIT-built where needed)
  ls .whl/deepspeed-*.whl >/dev/null 2>&1 || python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8 || exit 1
  du -sh .whl; exit 0
fi
start=$(date +%s)
PY=${CAIG_PYTHON:-python3}
PYFLAGS=()
[ -z "${WHEELDIR:-}" ] && [ -d .whl ] && [ "$DEVICE" = cuda ] && WHEELDIR=.whl
if [ -n "${WHEELDIR:-}" ]; then
  SITE=${CAIG_SITE:-/tmp/caig_site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELDIR"/*.whl \
    || { echo "gpu_check: wheel install failed"; exit 1; }
  # the project itself, built from this tree (caig_ray.jobs / caig_ray.actors / caig_ray.dataplane live in jobs/, actors/, dataplane/)
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" . \
    || { echo "gpu_check: installing caig-ray failed"; exit 1; }
  export PYTHONPATH=$SITE
  PYFLAGS=(-P)  # the checkout's caig_ray/ (without jobs/, actors/, dataplane/) must not shadow the installed one
elif [ -x .venv/bin/python ]; then
  PY=$PWD/.venv/bin/python
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} CAIG_GPU_CHECK_DEVICE=$DEVICE
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  # Ray's own temp dir, so that only the Ray this check starts is stopped at its end
  export RAY_TMPDIR=${RAY_TMPDIR:-$(mktemp -d /tmp/caig-gpu-ray.XXXXXX)}
fi
# from tests/: Ray puts its driver's working directory on every worker's sys.path, where the checkout's
# caig_ray/ would shadow the installed one
(cd tests && "$PY" "${PYFLAGS[@]}" -m pytest -q -p no:cacheprovider --run-gpu -m gpu test_gpu*.py -o addopts="" \
  --timeout 480 --durations=0 -W ignore::DeprecationWarning "${PYTEST_ARGS[@]}")
rc=$?
default=bench/results/gpu_check.json
[ "$DEVICE" = cpu ] && default=bench/results/gpu_check_cpu.json
[ -n "${OUT:-}" ] && cp "${CAIG_GPU_CHECK_OUT:-$default}" "$OUT/" 2>/dev/null
echo "gpu_check: pytest exited $rc after $(( $(date +%s) - start )) s on $DEVICE"
exit $rc
