import os

import pytest

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
