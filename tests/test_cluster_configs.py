import importlib
from pathlib import Path

import yaml

from caig_ray.config import ServeConfig

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_serve_config_parses_and_points_at_a_real_builder():
    doc = yaml.safe_load((CLUSTER / "serve.yaml").read_text())
    (app,) = doc["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    ServeConfig.model_validate(app["args"])  # the args are a valid serve block
