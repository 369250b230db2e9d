import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-gpu", action="store_true",
                     help="run the tests marked gpu (scripts/gpu_check.sh on a CUDA machine)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only with --run-gpu (scripts/gpu_check.sh, on CUDA, or on CPU with
    ``--device cpu``); everywhere else they are deselected -- reported as deselected, never silently
    skipped as passed."""
    if config.getoption("--run-gpu"):
        return
    keep = [i for i in items if "gpu" not in i.keywords]
    dropped = [i for i in items if "gpu" in i.keywords]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def check_device() -> str:
    """The GPU check's device: ``cuda`` on the GPU machine, ``cpu`` when scripts/gpu_check.sh runs with
    ``--device cpu`` (CI: the same tests at tiny sizes, so the check cannot rot)."""
    device = os.environ.get("CAIG_GPU_CHECK_DEVICE", "cuda")
    if device not in ("cuda", "cpu"):
        raise pytest.UsageError(f"CAIG_GPU_CHECK_DEVICE must be cuda or cpu, got {device!r}")
    return device


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    """The checkout's commit, with ``+changes`` when its tree differs; None without git (a copied tree)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


@pytest.fixture(scope="session")
def gpu_record(check_device):
    """What the GPU check measured, one dict for every tests/test_gpu*.py module; written at the end of
    the session to ``CAIG_GPU_CHECK_OUT`` (default bench/results/gpu_check.json on cuda,
    gpu_check_cpu.json on cpu) with the device's name."""
    import json
    import platform
    import time
    from pathlib import Path

    import torch

    name = torch.cuda.get_device_name(0) if check_device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    record = {"device": name, "check_device": check_device, "torch": torch.__version__, "cuda": torch.version.cuda,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
              # the machine's own packages or the carried wheels (scripts/gpu_check.sh): which ran
              "packages": {p: _version(p) for p in ("ray", "deepspeed", "transformers", "diffusers", "trl", "peft",
                                                    "pydantic", "fastapi")},
              "commit": _commit()}
    yield record
    default = "gpu_check.json" if check_device == "cuda" else "gpu_check_cpu.json"
    out = Path(os.environ.get("CAIG_GPU_CHECK_OUT", Path(__file__).parents[1] / "bench" / "results" / default))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))


@pytest.fixture(scope="session")
def quick_cfg():
    from caig_ray.config import load_config

    return load_config("quick")


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory, quick_cfg):
    """The quick world, written once per test session by the same code as `caig-ray make-world`."""
    from caig_ray.world import WorldLayout, make_world

    root = tmp_path_factory.mktemp("world")
    make_world(quick_cfg, root, progress=False)
    return WorldLayout(root)


@pytest.fixture(scope="session")
def hub_models(tmp_path_factory):
    """Tiny random checkpoints of the real families in their hub layouts (built once per session,
    ~5 s): ``{"llava_next": dir, "qwen2_vl": dir, "qwen2_5_vl": dir, "sd": dir, "controlnet": dir,
    "sd_fp16": dir, "controlnet_fp16": dir}``."""
    from caig_ray.testing.hub_families import FAMILIES, make_family, make_sd_folders

    root = tmp_path_factory.mktemp("hub_models")
    out = {f: make_family(f, root / f) for f in FAMILIES}
    out["sd"], out["controlnet"] = make_sd_folders(root / "sd", root / "controlnet")
    out["sd_fp16"], out["controlnet_fp16"] = make_sd_folders(root / "sd_fp16", root / "controlnet_fp16", variant="fp16")
    return out


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A local S3-compatible server (moto, started here; stopped at the end of the session) and the
    storage URI of an empty bucket on it. Credentials go through the usual AWS environment variables,
    which Ray workers started afterwards inherit; staging goes to a session temp dir."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "CAIG_STAGING_DIR")}
    os.environ.update(AWS_ACCESS_KEY_ID="caig-test", AWS_SECRET_ACCESS_KEY="caig-test",
                      CAIG_STAGING_DIR=str(tmp_path_factory.mktemp("staging")))
    import pyarrow.fs as pafs

    query = f"?endpoint_override=http://{host}:{port}&scheme=http&region=us-east-1&allow_bucket_creation=true"
    fs, _ = pafs.FileSystem.from_uri(f"s3://caig-runs{query}")
    fs.create_dir("caig-runs")
    yield f"s3://caig-runs/storage{query}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
