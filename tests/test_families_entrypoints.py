"""Every entrypoint on every real checkpoint family (issue 11), each family's chain once per suite;
tiny random models of the real architectures, hub layout. The expensive runs are shared: each chain's
jobs feed the assertions of what they write (issue 25: one run per family, several checks).

- LLaVA-NeXT, as functions: pretrain-pm -> train-rm (from the pretrained PM's folder, as CAIG does;
  ZeRO-3 on 2 ranks, the checkpoint reloaded into the scorer gives the trained engine's P(left)) ->
  evaluate-rm -> train (one online round under ZeRO-3; the other two chains' rounds run ZeRO-2, the
  quick preset's stage) -> generate (the run's own policy, by the path the summary gives) -> serve.
- Qwen2.5-VL, by the CLI mains with ``--storage`` (a shared POSIX folder) and relative ``--out``:
  make-world -> pretrain-pm -> train-rm (``--init-from`` the PM; ZeRO-1) -> evaluate-rm -> train ->
  generate -> serve; every file they write is under the storage folder, none in the working directory.
- Qwen2-VL's chain is the object-store one (tests/test_storage.py: every model given as the URI an
  earlier job wrote). ZeRO-2 for train-rm runs in the demo, the job-submit and the CLI tests."""

import base64
import io
import json
import socket
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml
from PIL import Image

from caig_ray.config import load_config
from caig_ray.data import read_catalog, write_catalog
from caig_ray.testing.hub_families import tiny_chain_overrides

FUNCTION_CHAIN_FAMILY = "llava_next"  # also the ZeRO-3 online round's family
CLI_STORAGE_CHAIN_FAMILY = "qwen2_5_vl"


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


def _model_type(folder: Path) -> str:
    return json.loads((Path(folder) / "config.json").read_text())["model_type"]


def _assert_pretrained(summary: dict, pm: Path, family: str, held_out: int) -> None:
    from caig_ray.models.policy import load_policy

    assert summary["steps"] >= 1 and summary["n_examples"] >= 1 and summary["held_out_products"] == held_out
    assert 0.0 <= summary["scene_word_share_after"] <= 1.0
    assert _model_type(pm) == family
    model, _ = load_policy(pm)  # the folder loads back by the same code the loop uses
    assert model.config.model_type == family


def _assert_rm_reloads_into_the_scorer(summary: dict, rm: Path, cfg, world) -> None:
    """The checkpoint, loaded into the scorer actor, gives the trained engine's P(left) on its probe pairs."""
    from caig_ray.actors.scorer import RewardScorer
    from caig_ray.data import load_log_image, read_click_logs
    from caig_ray.imaging import png_bytes

    logs = read_click_logs(world.click_logs, check_images=False)
    title = logs.column("title").to_pylist()
    rows = summary["probe_rows"]
    batch = {"left_image": [png_bytes(load_log_image(logs, a, world.root)) for a, _ in rows],
             "right_image": [png_bytes(load_log_image(logs, b, world.root)) for _, b in rows],
             "title": [title[a] for a, _ in rows], "rm_score": [True] * len(rows)}
    actor = ray.remote(num_cpus=1)(RewardScorer).remote(str(rm), cfg.reward.pair_image_size, batch_size=4)
    try:
        scored = ray.get(actor.__call__.remote(dict(batch)))
    finally:
        ray.kill(actor)
    assert scored["p_left"] == pytest.approx(summary["probe_p_left"], abs=1e-5)


def _assert_evaluation(ev: dict) -> None:
    assert ev["n_test_pairs"] > 5 and ev["chance"] == 0.5
    for key in ("rm_accuracy_logged", "rm_debiased_accuracy_logged", "cnn_baseline_accuracy_logged",
                "bayes_ceiling_test_pairs", "rm_accuracy_true"):
        assert 0.0 <= ev[key] <= 1.0, key
    assert ev["bayes_ceiling_test_pairs"] > 0.5


def _assert_online_round(s: dict) -> None:
    assert s["rounds"] == 1 and s["pairs_lost"] == 0 and s["pairs_duplicated"] == 0
    assert s["pairs_trained"] + s["pairs_skipped"] == s["pairs_planned"] == 4 and s["steps"] >= 1


def _small_catalog(world, tmp_path: Path) -> Path:
    """generate's catalog: two of the world's products (the job's cost grows with each one; two show
    the ranking inside a product and the parts across products)."""
    return write_catalog(read_catalog(world.catalog)[:2], tmp_path / "shop" / "catalog.json")


def _serve_answers(rm: str, name: str) -> None:
    from ray import serve

    from caig_ray.jobs.serve_rm import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"reward": {"model_path": rm},
                             "resources": {"serve": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}}}),
                  name=name, route_prefix="/")
        body = json.dumps({"product": {"title": "red sneakers"}, "image_a": _png_b64((200, 20, 20)),
                           "image_b": _png_b64((20, 20, 200))}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/score", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            out = json.loads(resp.read())
        assert 0 <= out["p_first_better_debiased"] <= 1
    finally:
        serve.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_every_entrypoint_on_a_real_family(local_ray, quick_world, hub_models, tmp_path):
    from caig_ray.jobs.evaluate_rm import evaluate_rm
    from caig_ray.jobs.generate import generate
    from caig_ray.jobs.pretrain_pm import pretrain_pm
    from caig_ray.jobs.train import train
    from caig_ray.jobs.train_rm import train_rm

    family = FUNCTION_CHAIN_FAMILY
    cfg = _cfg(hub_models[family])
    pm = tmp_path / "pm"
    _assert_pretrained(pretrain_pm(cfg, quick_world.root, pm), pm, family, cfg.pretrain.eval_products)

    cfg = _cfg(hub_models[family], reward={"backbone_path": str(pm)})  # CAIG: the RM starts from PM0
    rm = tmp_path / "rm"
    s = train_rm(cfg, quick_world.root, rm)
    assert s["zero_stage"] == 3 and _model_type(rm) == family
    # Ray Train's equal shards of the pairs: the same number of whole batches on each rank
    ranks = cfg.resources.reward_training.num_workers
    assert ranks == 2 and s["pairs_per_rank"] == cfg.train_rm.max_pairs // ranks
    assert s["step"] == s["pairs_per_rank"] // cfg.train_rm.batch_size >= 1
    _assert_rm_reloads_into_the_scorer(s, rm, cfg, quick_world)

    ev = evaluate_rm(cfg, quick_world.root, rm, tmp_path / "rm_eval.json")
    assert json.loads((tmp_path / "rm_eval.json").read_text()) == ev
    _assert_evaluation(ev)

    s = train(_cfg(hub_models[family], policy={"zero_stage": 3}), tmp_path / "online_z3", str(pm), str(rm),
              str(quick_world.catalog), progress=False)
    _assert_online_round(s)

    g = generate(cfg, _small_catalog(quick_world, tmp_path), tmp_path / "gen", s["policy_path"], str(rm),
                 n=2)  # the tuned policy, by path
    assert g["products"] == 2 and g["candidates"] == 4
    _serve_answers(str(rm), f"rm-{family}")


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_every_entrypoint_by_its_cli_writes_only_under_storage(local_ray, quick_world, hub_models, tmp_path,
                                                               monkeypatch):
    from caig_ray.jobs import evaluate_rm, generate, make_world, pretrain_pm, train as train_job, train_rm

    family = CLI_STORAGE_CHAIN_FAMILY
    storage, cwd = tmp_path / "shared", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    over = tiny_chain_overrides(hub_models[family])
    over["train_rm"]["zero_stage"] = 1
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump({"base": "quick", **over}))
    st = ["--config", str(tmp_path / "chain.yaml"), "--storage", str(storage)]
    world = ["--world", str(quick_world.root)]

    assert make_world.main([*st, "--out", "world", "--no-models"]) == 0
    assert pretrain_pm.main([*st, *world, "--out", "pm"]) == 0
    assert train_rm.main([*st, *world, "--init-from", str(storage / "pm"), "--out", "rm"]) == 0
    assert evaluate_rm.main([*st, *world, "--rm", str(storage / "rm"), "--out", "rm_eval.json"]) == 0
    assert train_job.main([*st, "--catalog", str(quick_world.catalog), "--policy", str(storage / "pm"),
                           "--rm", str(storage / "rm"), "--out", "runs/online", "--rounds", "1"]) == 0
    assert generate.main([*st, "--catalog", str(_small_catalog(quick_world, tmp_path)),
                          "--policy", str(storage / "runs/online/policy"),
                          "--rm", str(storage / "rm"), "--out", "ads", "--n", "2"]) == 0
    _serve_answers(str(storage / "rm"), f"rm-{family}")

    assert not _files(cwd), _files(cwd)
    written = _files(storage)
    for expected in ("world/catalog/catalog.json", "pm/config.json", "pm/pretrain_metrics.json", "rm/config.json", "rm/train_metrics.json",
                     "rm_eval.json", "ads/generate_summary.json", "ads/gallery.html", "runs/online/summary.json",
                     "runs/online/metrics.jsonl", "runs/online/checkpoints/round_000/state.json",
                     "runs/online/policy/config.json", "runs/online/pairs/round_000.parquet",
                     "runs/online/report.html"):
        assert expected in written, expected
    assert any(f.startswith("ads/best/part-") for f in written)  # generate's parts, as it went
    assert any(f.startswith("ads/catalog/valid/") for f in written)  # and its validated catalog
    assert any(f.startswith("rm_ray/") for f in written)  # Ray Train's own checkpoints: under storage too
    assert any(f.startswith("rm_tensorboard/") for f in written)
    for model in ("pm", "rm", "runs/online/policy"):  # the family carried through every job
        assert _model_type(storage / model) == family, model
    _assert_pretrained(json.loads((storage / "pm" / "pretrain_metrics.json").read_text()), storage / "pm", family,
                       over["pretrain"]["eval_products"])
    rm_metrics = json.loads((storage / "rm" / "train_metrics.json").read_text())
    assert rm_metrics["zero_stage"] == 1 and rm_metrics["step"] >= 1
    _assert_evaluation(json.loads((storage / "rm_eval.json").read_text()))
    run = json.loads((storage / "runs" / "online" / "summary.json").read_text())
    _assert_online_round(run)
    assert run["storage"] == str(storage / "runs" / "online")


def test_the_three_chains_cover_every_family():
    from caig_ray.testing.hub_families import FAMILIES, OBJECT_STORE_CHAIN_FAMILY

    chains = [FUNCTION_CHAIN_FAMILY, CLI_STORAGE_CHAIN_FAMILY, OBJECT_STORE_CHAIN_FAMILY]
    assert sorted(chains) == sorted(FAMILIES)
