"""Every entrypoint on every real checkpoint family (issue 11): pretrain-pm -> train-rm (the RM starts
from the pretrained PM's folder, as CAIG does) -> evaluate-rm -> train (one online round under
ZeRO-3; under ZeRO-2 too for one family: the stage's code path does not depend on the family) ->
generate (with the run's own policy folder, by the path the summary gives) -> serve (real HTTP on
127.0.0.1). Tiny random models of the real architectures, hub layout.

Qwen2-VL's chain is the object-store one (tests/test_storage.py: the same entrypoints, every model
given as the URI an earlier job wrote), so each family's chain runs once per suite."""

import base64
import io
import json
import socket
import urllib.request

import pytest
import ray
from PIL import Image

from caig_ray.config import load_config
from caig_ray.data import read_catalog, write_catalog
from caig_ray.testing.hub_families import FAMILIES, OBJECT_STORE_CHAIN_FAMILY, tiny_chain_overrides

LOCAL_CHAIN_FAMILIES = [f for f in FAMILIES if f != OBJECT_STORE_CHAIN_FAMILY]
ZERO2_FAMILY = "llava_next"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _cfg(family_dir, **extra):
    over = tiny_chain_overrides(family_dir)
    for key, value in extra.items():
        over.setdefault(key, {}).update(value)
    return load_config("quick", overrides=over)


def _png_b64(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("family", LOCAL_CHAIN_FAMILIES)
def test_every_entrypoint_on_a_real_family(local_ray, quick_world, hub_models, tmp_path, family):
    from ray import serve

    from caig_ray.jobs.train import train
    from caig_ray.jobs.evaluate_rm import evaluate_rm
    from caig_ray.jobs.generate import generate
    from caig_ray.jobs.pretrain_pm import pretrain_pm
    from caig_ray.jobs.serve_rm import build_app
    from caig_ray.jobs.train_rm import train_rm

    cfg = _cfg(hub_models[family])
    pm = tmp_path / "pm"
    s = pretrain_pm(cfg, quick_world.root, pm)
    assert s["steps"] >= 1 and json.loads((pm / "config.json").read_text())["model_type"] == family

    cfg = _cfg(hub_models[family], reward={"backbone_path": str(pm)})  # CAIG: the RM starts from PM0
    rm = tmp_path / "rm"
    s = train_rm(cfg, quick_world.root, rm)
    assert s["zero_stage"] == 3 and json.loads((rm / "config.json").read_text())["model_type"] == family

    ev = evaluate_rm(cfg, quick_world.root, rm, tmp_path / "rm_eval.json")
    assert ev["n_test_pairs"] > 0 and 0 <= ev["rm_accuracy_logged"] <= 1

    for stage in ((3, 2) if family == ZERO2_FAMILY else (3,)):
        run = tmp_path / f"online_z{stage}"
        s = train(_cfg(hub_models[family], policy={"zero_stage": stage}), run, str(pm), str(rm),
                  str(quick_world.catalog), progress=False)
        assert s["rounds"] == 1 and s["pairs_lost"] == 0 and s["pairs_duplicated"] == 0
        assert s["pairs_trained"] + s["pairs_skipped"] == s["pairs_planned"] == 4 and s["steps"] >= 1

    products = read_catalog(quick_world.catalog)[:2]
    catalog = write_catalog(products, tmp_path / "shop" / "catalog.json")
    g = generate(cfg, catalog, tmp_path / "gen", s["policy_path"], str(rm), n=2)  # the tuned policy, by path
    assert g["products"] == 2 and g["candidates"] == 4

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"reward": {"model_path": str(rm)},
                             "resources": {"serve": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}}}),
                  name=f"rm-{family}", route_prefix="/")
        body = json.dumps({"product": {"title": "red sneakers"}, "image_a": _png_b64((200, 20, 20)),
                           "image_b": _png_b64((20, 20, 200))}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/score", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            out = json.loads(resp.read())
        assert 0 <= out["p_first_better_debiased"] <= 1
    finally:
        serve.shutdown()
