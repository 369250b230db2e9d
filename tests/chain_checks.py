"""Checks shared by the family chains (tests/test_families_entrypoints.py, tests/test_job_submit.py,
tests/test_storage.py): what each entrypoint's output must hold, whichever way the job was run; and
``job_lines``, a job's own stderr lines for the tests that read them."""

import base64
import io
import json
import re
import socket
import urllib.request
from pathlib import Path

import pytest
import ray
from PIL import Image

from caig_ray.data import read_catalog, write_catalog


def png_b64(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def model_type(folder: Path) -> str:
    return json.loads((Path(folder) / "config.json").read_text())["model_type"]


def assert_pretrained(summary: dict, pm: Path, family: str, held_out: int) -> None:
    from caig_ray.models.policy import load_policy

    assert summary["steps"] >= 1 and summary["n_examples"] >= 1 and summary["held_out_products"] == held_out
    assert 0.0 <= summary["scene_word_share_after"] <= 1.0
    assert model_type(pm) == family
    model, _ = load_policy(pm)  # the folder loads back by the same code the loop uses
    assert model.config.model_type == family


def assert_rm_reloads_into_the_scorer(summary: dict, rm: Path, cfg, world) -> None:
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


def assert_evaluation(ev: dict) -> None:
    assert ev["n_test_pairs"] > 5 and ev["chance"] == 0.5
    for key in ("rm_accuracy_logged", "rm_debiased_accuracy_logged", "cnn_baseline_accuracy_logged",
                "bayes_ceiling_test_pairs", "rm_accuracy_true"):
        assert 0.0 <= ev[key] <= 1.0, key
    assert ev["bayes_ceiling_test_pairs"] > 0.5


def assert_online_round(s: dict) -> None:
    assert s["rounds"] == 1 and s["pairs_lost"] == 0 and s["pairs_duplicated"] == 0
    assert s["pairs_trained"] + s["pairs_skipped"] == s["pairs_planned"] == 4 and s["steps"] >= 1


def small_catalog(world, tmp_path: Path, n: int = 2) -> Path:
    """generate's catalog: ``n`` of the world's products (the job's cost grows with each one; two show
    the ranking inside a product and the parts across products)."""
    return write_catalog(read_catalog(world.catalog)[:n], tmp_path / "shop" / "catalog.json")


def serve_answers(rm: str, name: str) -> None:
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
        body = json.dumps({"product": {"title": "red sneakers"}, "image_a": png_b64((200, 20, 20)),
                           "image_b": png_b64((20, 20, 200))}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/score", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            out = json.loads(resp.read())
        assert 0 <= out["p_first_better_debiased"] <= 1
    finally:
        serve.shutdown()


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# What Ray's log monitor forwards from a worker, actor or replica: "(Name pid=123, ip=...) ...", coloured on a tty
# or under pytest's capture. It can arrive at any time from an earlier test's actors on the same Ray.
_RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\([^()]*pid=\d+[^()]*\)")


def job_lines(stderr: str) -> list[str]:
    """The job's own lines of ``stderr``: Ray's forwarded worker lines left out."""
    return [line for line in stderr.strip().splitlines() if not _RAY_FORWARDED.match(line)]
