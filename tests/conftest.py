import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-gpu", action="store_true",
                     help="run the tests marked gpu (scripts/gpu_check.sh on a CUDA machine)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA and run only with --run-gpu (scripts/gpu_check.sh); everywhere
    else they are deselected -- reported as deselected, never silently skipped as passed."""
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
    from caig_ray.models.hub_families import FAMILIES, make_family, make_sd_folders

    root = tmp_path_factory.mktemp("hub_models")
    out = {f: make_family(f, root / f) for f in FAMILIES}
    out["sd"], out["controlnet"] = make_sd_folders(root / "sd", root / "controlnet")
    out["sd_fp16"], out["controlnet_fp16"] = make_sd_folders(root / "sd_fp16", root / "controlnet_fp16", variant="fp16")
    return out
