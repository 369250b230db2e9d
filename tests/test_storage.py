"""``storage`` (caig_ray/storage.py): where every output lives -- a shared POSIX path or an object
store (a local S3 server, moto, started by the test) -- and that every entrypoint writes only there."""

import json

import pytest
import yaml

from caig_ray.config import ConfigError
from caig_ray.storage import Output, resolve_output, staging_root
from caig_ray.testing.hub_families import OBJECT_STORE_CHAIN_FAMILY, tiny_chain_overrides


def test_out_resolves_under_a_posix_storage_and_outside_is_refused(tmp_path):
    root = tmp_path / "shared"
    assert resolve_output(str(root), "runs/a") == Output(root / "runs" / "a")
    assert resolve_output(str(root), str(root / "runs" / "b")).local == root / "runs" / "b"
    assert resolve_output(None, tmp_path / "x").local == tmp_path / "x"
    for bad in (str(tmp_path / "elsewhere"), "../escape"):
        with pytest.raises(ConfigError, match="outside storage"):
            resolve_output(str(root), bad)
    with pytest.raises(ConfigError, match="--storage"):
        resolve_output(None, "s3://bucket/run")


def test_out_under_an_object_store_is_staged_and_uploaded(s3_store, tmp_path):
    out = resolve_output(s3_store, "runs/a")
    assert out.staged and staging_root() in out.local.parents and out.uri.split("?")[0].endswith("/storage/runs/a")
    with pytest.raises(ConfigError, match="relative"):
        resolve_output(s3_store, str(tmp_path / "abs"))
    with pytest.raises(ConfigError, match="outside storage"):
        resolve_output(s3_store, "s3://another-bucket/run")
    (out.local / "sub").mkdir(parents=True)
    (out.local / "sub" / "w.bin").write_bytes(b"\x00\x01" * 1000)
    (out.local / "keep-local").write_text("x")
    out.upload(exclude=("keep-local",))
    assert out.listdir() == ["sub"] and out.child("sub/w.bin").exists()
    fresh = Output(tmp_path / "fresh", out.uri)  # another pod: nothing local
    assert fresh.download() and (fresh.local / "sub" / "w.bin").read_bytes() == b"\x00\x01" * 1000
    out.child("sub").delete()
    assert not out.child("sub").exists() and not Output(tmp_path / "none", out.child("sub").uri).download()


def test_a_bad_storage_uri_is_one_clear_error():
    with pytest.raises(ConfigError, match="storage 'nosuchfs://x'"):
        resolve_output("nosuchfs://x", "run")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_whole_chain_runs_on_object_storage_with_models_given_as_uris(quick_world, s3_store, hub_models,
                                                                         tmp_path, monkeypatch):
    """pretrain-pm -> train-rm -> evaluate-rm -> train -> generate -> serve with --storage on the local S3
    server and every model a later job reads given as the URI an earlier one wrote (no local model folder
    passed): each is read through the node's model cache, and the Serve replica answers a real request.
    The chain starts from the tiny Qwen2-VL in its hub layout: this is that family's every-entrypoint
    chain (tests/test_families_entrypoints.py runs the other families')."""
    import base64
    import io
    import socket

    import httpx
    import numpy as np
    import ray
    from PIL import Image
    from ray import serve

    from caig_ray.data import read_catalog, write_catalog
    from caig_ray.jobs import train as train_job, evaluate_rm, generate, pretrain_pm, train_rm
    from caig_ray.jobs.serve_rm import build_app
    from caig_ray.storage import model_cache_root

    monkeypatch.setenv("CAIG_MODEL_CACHE", str(tmp_path / "model-cache"))  # before Ray starts: workers inherit it
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    cfg = tmp_path / "chain.yaml"
    family = OBJECT_STORE_CHAIN_FAMILY
    cfg.write_text(yaml.safe_dump({"base": "quick", **tiny_chain_overrides(hub_models[family])}))
    st = ["--config", str(cfg), "--storage", s3_store]
    at = s3_store.split("?")[0]  # s3://caig-runs/storage: what a user types; the storage's endpoint is carried over
    world = ["--world", str(quick_world.root)]
    # one Ray for the chain (each main joins it, as under `ray job submit`; mains starting their own
    # local Ray run in tests/test_online_loop.py and tests/test_cli.py): its workers see CAIG_MODEL_CACHE
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        assert pretrain_pm.main([*st, *world, "--out", "pm"]) == 0
        assert train_rm.main([*st, *world, "--init-from", f"{at}/pm", "--out", "rm"]) == 0
        assert evaluate_rm.main([*st, *world, "--rm", f"{at}/rm", "--out", "rm_eval.json"]) == 0
        assert train_job.main([*st, "--catalog", str(quick_world.catalog), "--policy", f"{at}/pm", "--rm", f"{at}/rm",
                          "--out", "runs/week-1", "--rounds", "1"]) == 0
        shop = write_catalog(read_catalog(quick_world.catalog)[:2], tmp_path / "shop" / "catalog.json")  # 2 products: enough
        assert generate.main([*st, "--catalog", str(shop), "--policy", f"{at}/runs/week-1/policy",
                              "--rm", f"{at}/rm", "--out", "ads", "--n", "2"]) == 0
        cached = sorted(p.name for p in model_cache_root().iterdir() if p.is_dir())
        assert len(cached) >= 3, cached  # pm, rm, the run's policy: each downloaded once to this node
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"reward": {"model_path": f"{at}/rm{s3_store[len(at):]}"},
                             "resources": {"serve": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5}}}),
                  name="caig-rm", route_prefix="/")
        ads = []
        for seed in (1, 2):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
            ads.append(base64.b64encode(buf.getvalue()).decode())
        with httpx.Client(timeout=60) as client:
            r = client.post(f"http://127.0.0.1:{port}/v1/score",
                            json={"product": {"title": "red sneakers"}, "image_a": ads[0], "image_b": ads[1]})
            health = client.get(f"http://127.0.0.1:{port}/healthz").json()
        assert r.status_code == 200, r.text
        assert 0 < r.json()["p_first_better"] < 1 and health["model_path"].startswith(f"{at}/rm")
    finally:
        serve.shutdown()
        ray.shutdown()
    assert not any((tmp_path / "cwd").iterdir())  # nothing written where the jobs ran
    fs_listing = {f for f in _stored(s3_store)}
    for expected in ("pm/config.json", "rm/config.json", "rm_eval.json", "runs/week-1/run.json",
                     "runs/week-1/policy/config.json", "ads/generate_summary.json"):
        assert expected in fs_listing, expected
    for model in ("pm", "rm", "runs/week-1/policy"):  # the family carried through every job
        assert json.loads(_read(s3_store, f"{model}/config.json"))["model_type"] == family, model
    evaluation = json.loads(_read(s3_store, "rm_eval.json"))
    assert evaluation["n_test_pairs"] > 0 and 0 <= evaluation["rm_accuracy_logged"] <= 1
    week = json.loads(_read(s3_store, "runs/week-1/summary.json"))
    assert week["pairs_lost"] == 0 and week["steps"] >= 1


def _read(storage: str, name: str) -> bytes:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage)
    with fs.open_input_stream(f"{root}/{name}") as f:
        return f.read()


def _stored(storage: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage)
    return [e.path[len(root) + 1:] for e in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if e.type == pafs.FileType.File]
