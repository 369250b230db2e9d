#!/usr/bin/env bash
# A venv like the lent GPU machine's image, to rehearse the GPU check here (docs/development.md, GPU
# check): Python 3.12 and the image's packages that the check imports (scripts/gpu_image_packages.txt
# lists all it holds), nothing that scripts/gpu_check.sh carries. torch is PyPI's 2.13.0 build (the
# image has 2.11.0+cu130; it runs on CPU here).
#
#   bash scripts/gpu_image_venv.sh /tmp/imgvenv [python3.12]
#   bash scripts/gpu_check.sh --fetch-wheels
#   CAIG_PYTHON=/tmp/imgvenv/bin/python bash scripts/gpu_check.sh --device cpu --wheels .whl
set -euo pipefail
VENV=${1:?usage: $0 VENV_DIR [PYTHON]}
PY=${2:-python3.12}
[ -e "$VENV" ] && { echo "gpu_image_venv: $VENV exists; name a new folder"; exit 2; }
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0 transformers==5.17.0 tokenizers safetensors \
  huggingface-hub peft accelerate pyarrow pandas numpy pillow aiohttp grpcio msgpack protobuf pyyaml requests fsspec \
  psutil prometheus-client tensorboard pytest pytest-timeout filelock packaging jinja2 click httpx tqdm regex \
  opencv-python-headless scipy matplotlib sentencepiece typing-extensions anyio h11 xxhash py-cpuinfo ninja uvloop \
  aiofiles rich cloudpickle einops zipp
# what pip pulled in that the image does not hold (typer's pydantic): the carried wheels must stand alone
"$VENV/bin/pip" uninstall -y -q pydantic pydantic-core annotated-types typing-inspection 2>/dev/null || true
"$VENV/bin/python" -c "import torch, transformers; print('gpu_image_venv: torch', torch.__version__, '| transformers', transformers.__version__)"
