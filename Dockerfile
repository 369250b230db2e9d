# The image every manifest in cluster/ names (docs/cluster.md):
#   docker build -t caig-ray:latest .
#   docker tag caig-ray:latest REGISTRY/caig-ray:TAG && docker push REGISTRY/caig-ray:TAG
#   (then set that image in the manifests)
# A CUDA PyTorch base (its pip-installed CUDA torch satisfies torch>=2.6, so pip keeps it; the build
# fails rather than replace it), Ray pinned to the manifests' rayVersion, every other dependency at the
# version CI ran with (pip install -c constraints.txt), and the project installed non-editable into
# site-packages (caig_ray, caig_ray.jobs, caig_ray.actors, caig_ray.dataplane, the `caig-ray` command): jobs run from the
# image and upload no working_dir.
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
# constraints.txt (the repo top's): the exact version of every dependency CI ran with, torch left out.
# The base's torch stack wins where it disagrees: a pin that the base's torch, torchvision or torchaudio
# does not accept (torch 2.6.0 requires sympy==1.13.1; CI's torch took sympy 1.14.0) is left out of the
# build's copy and printed, and pip installs what that torch requires. Every other pin applies as is.
COPY pyproject.toml README.md constraints.txt ./
RUN python -c "import sys, importlib.metadata as md; \
from pip._vendor.packaging.requirements import Requirement; \
from pip._vendor.packaging.utils import canonicalize_name as cn; \
have = {cn(d.metadata['Name']) for d in md.distributions()}; \
reqs = [Requirement(r) for d in ('torch', 'torchvision', 'torchaudio') if d in have for r in md.requires(d) or []]; \
reqs = [r for r in reqs if r.marker is None or r.marker.evaluate({'extra': ''})]; \
pins = [s.strip() for s in open(sys.argv[1]) if s.strip() and not s.startswith('#')]; \
off = [p for p in pins if any(cn(r.name) == cn(p.split('==')[0]) and p.split('==')[1] not in r.specifier for r in reqs)]; \
print('constraints.txt: left out for the base torch:', ' '.join(off) or 'nothing'); \
open(sys.argv[2], 'w').writelines(p + '\n' for p in pins if p not in off)" \
    constraints.txt /tmp/constraints-image.txt
COPY caig_ray ./caig_ray
COPY jobs ./jobs
COPY actors ./actors
COPY dataplane ./dataplane
RUN pip install -c /tmp/constraints-image.txt -c /tmp/torch-constraints.txt \
        "ray[default,train,serve,data]==${RAY_VERSION}" . \
    && cd / && rm -rf /tmp/caig-ray \
    && python -c "import caig_ray.jobs.cli, caig_ray.jobs.train, caig_ray.actors.scorer, caig_ray.dataplane.stream, ray, torch; \
assert ray.__version__ == '${RAY_VERSION}', ray.__version__; assert torch.version.cuda; \
print('caig-ray image: torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__)" \
    && caig-ray --help > /dev/null

WORKDIR /home/caig
CMD ["caig-ray", "--help"]
