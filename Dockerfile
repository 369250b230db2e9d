# The image every manifest in cluster/ names (docs/cluster.md):
#   docker build -t caig-ray:latest .
#   docker tag caig-ray:latest REGISTRY/caig-ray:TAG && docker push REGISTRY/caig-ray:TAG
#   (then set that image in the manifests)
# A CUDA PyTorch base (its pip-installed CUDA torch satisfies torch>=2.6, so pip keeps it; the build
# fails rather than replace it), Ray pinned to the manifests' rayVersion, and the project installed
# non-editable into site-packages (caig_ray, caig_ray.jobs, caig_ray.actors, the `caig-ray` command):
# jobs run from the image and upload no working_dir.
# BASE_IMAGE must hold Python >= 3.11 (transformers 5, trl and diffusers require it; checked below).
ARG BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG RAY_VERSION=2.60.0

ENV HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_AUTH_MODE=token

# KubeRay's default readiness/liveness probes run wget; the online RayJob's entrypoint runs date (coreutils)
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# The base's torch (and torchvision/torchaudio) as constraints: pip keeps them, or fails instead of
# replacing the CUDA build with another one.
RUN python -c "import sys; assert sys.version_info >= (3, 11), sys.version" \
    && python -c "import torch; assert torch.version.cuda, 'the base image must hold a CUDA build of torch'" \
    && pip list --format=freeze | grep -iE '^(torch|torchvision|torchaudio)==' > /tmp/torch-constraints.txt \
    && cat /tmp/torch-constraints.txt

WORKDIR /tmp/caig-ray
COPY pyproject.toml README.md ./
COPY caig_ray ./caig_ray
COPY jobs ./jobs
COPY actors ./actors
RUN pip install -c /tmp/torch-constraints.txt "ray[default,train,serve,data]==${RAY_VERSION}" . \
    && cd / && rm -rf /tmp/caig-ray \
    && python -c "import caig_ray.jobs.cli, caig_ray.actors.scorer, ray, torch; \
assert ray.__version__ == '${RAY_VERSION}', ray.__version__; assert torch.version.cuda; \
print('caig-ray image: torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__)" \
    && caig-ray --help > /dev/null

WORKDIR /home/caig
CMD ["caig-ray", "--help"]
