"""Entrypoints as `ray job submit` runs them, against a real local head with the dashboard on
127.0.0.1 (RAY_AUTH_MODE pinned); the head (only it) is always stopped. Qwen2.5-VL's every-entrypoint
chain runs here (tests/test_families_entrypoints.py names the others'): its train-rm and generate are
submitted jobs, the other jobs' mains run in this process joined to the head as a submitted job's driver
is (``RAY_ADDRESS``)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml
from caig_ray.testing.hub_families import CLI_STORAGE_CHAIN_FAMILY, tiny_chain_overrides
from chain_checks import assert_evaluation, assert_online_round, assert_pretrained, files_under, model_type, \
    serve_answers, small_catalog
from ray_cleanup import stop_own_ray

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, env, timeout=300):
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ray_head():
    """One real head for the module: the jobs are submitted to it, and it is the other cluster on the host
    that stopping ours must leave running."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="caig-head-", dir="/tmp")  # short: Ray's socket paths have a limit
    started = _run([RAY, "start", "--head", "--temp-dir", temp_dir, "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
                    "--disable-usage-stats"], env)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        address = f"http://127.0.0.1:{dash}"
        for _ in range(60):  # the job server comes up with the dashboard
            if _run([RAY, "job", "list", "--address", address], env, timeout=60).returncode == 0:
                break
            time.sleep(1)
        yield address, env, temp_dir, f"127.0.0.1:{gcs}"
    finally:
        stop_own_ray(temp_dir)  # this head only: other clusters on the host stay up
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address, env, entrypoint: list[str], timeout=600):
    for _ in range(10):
        res = _run([RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                    sys.executable, *entrypoint], env, timeout=timeout)
        # the head's job agent can come up after the job server answers `job list` (seen on a loaded
        # 2-core machine): Ray says so with this 500 and nothing was submitted, so submitting again is safe
        if "No available agent to submit job" not in res.stderr + res.stdout:
            break
        time.sleep(3)
    assert res.returncode == 0 and "succeeded" in (res.stdout + res.stderr).lower(), \
        (res.stdout + res.stderr)[-4000:]
    return res


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_every_entrypoint_by_its_cli_and_ray_job_submit_writes_only_under_storage(ray_head, quick_world, hub_models,
                                                                                   tmp_path, monkeypatch):
    """make-world -> pretrain-pm -> train-rm (``--init-from`` the PM; ZeRO-1; submitted) -> evaluate-rm ->
    train -> generate (6 products; submitted) -> serve, on the tiny Qwen2.5-VL, with ``--storage`` (a
    shared POSIX folder) and relative ``--out``: every file they write is under the storage folder, none
    in the working directory."""
    from caig_ray.jobs import evaluate_rm, make_world, pretrain_pm, train as train_job

    address, env, _, gcs = ray_head
    monkeypatch.setenv("RAY_ADDRESS", gcs)  # the in-process mains join the head (init_ray), as a job's driver
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
    _submit(address, env, ["-m", "caig_ray.jobs.train_rm", *st, *world, "--init-from", str(storage / "pm"),
                           "--out", "rm"])
    assert evaluate_rm.main([*st, *world, "--rm", str(storage / "rm"), "--out", "rm_eval.json"]) == 0
    assert train_job.main([*st, "--catalog", str(quick_world.catalog), "--policy", str(storage / "pm"),
                           "--rm", str(storage / "rm"), "--out", "runs/online", "--rounds", "1"]) == 0
    _submit(address, env, ["-m", "caig_ray.jobs.generate", *st, "--catalog", str(small_catalog(quick_world, tmp_path, 6)),
                           "--policy", str(storage / "runs/online/policy"), "--rm", str(storage / "rm"), "--out", "ads",
                           "--n", "2"])
    serve_answers(str(storage / "rm"), f"rm-{family}")
    ray.shutdown()  # this process leaves the head (the module's next test stops another Ray beside it)

    assert not files_under(cwd), files_under(cwd)
    written = files_under(storage)
    for expected in ("world/catalog/catalog.json", "pm/config.json", "pm/pretrain_metrics.json", "rm/config.json",
                     "rm/train_metrics.json", "rm_eval.json", "ads/generate_summary.json", "ads/gallery.html",
                     "runs/online/summary.json", "runs/online/metrics.jsonl",
                     "runs/online/checkpoints/round_000/state.json", "runs/online/policy/config.json",
                     "runs/online/pairs/round_000.parquet", "runs/online/report.html"):
        assert expected in written, expected
    assert any(f.startswith("ads/best/part-") for f in written)  # generate's parts, as it went
    assert any(f.startswith("ads/catalog/valid/") for f in written)  # and its validated catalog
    assert pq.read_table(storage / "ads" / "best").num_rows == 6  # each product's best ad, once
    assert any(f.startswith("rm_ray/") for f in written)  # Ray Train's own checkpoints: under storage too
    assert any(f.startswith("rm_tensorboard/") for f in written)
    for model in ("pm", "rm", "runs/online/policy"):  # the family carried through every job
        assert model_type(storage / model) == family, model
    assert_pretrained(json.loads((storage / "pm" / "pretrain_metrics.json").read_text()), storage / "pm", family,
                      over["pretrain"]["eval_products"])
    rm_metrics = json.loads((storage / "rm" / "train_metrics.json").read_text())
    assert rm_metrics["zero_stage"] == 1 and rm_metrics["step"] >= 1
    assert_evaluation(json.loads((storage / "rm_eval.json").read_text()))
    run = json.loads((storage / "runs" / "online" / "summary.json").read_text())
    assert_online_round(run)
    assert run["storage"] == str(storage / "runs" / "online")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cleanup_stops_only_the_ray_it_started(ray_head):
    """Two local heads, each under its own temp dir (the other: the module's head, which ran the jobs):
    stopping ours leaves the other one running (what scripts/test.sh does on exit)."""
    import psutil
    from ray_cleanup import own_ray_processes

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    ours, theirs = tempfile.mkdtemp(prefix="caig-ours-", dir="/tmp"), ray_head[2]
    try:
        started = _run([RAY, "start", "--head", "--temp-dir", ours, "--node-ip-address", "127.0.0.1",
                        "--port", str(_free_port()), "--num-cpus", "1", "--include-dashboard", "false",
                        "--disable-usage-stats"], env)
        assert started.returncode == 0, started.stderr[-2000:]
        # the other cluster's own daemons (gcs_server, raylet, ...: their command lines name its temp dir);
        # its worker processes come and go by themselves, so they are not compared
        daemons = {p.pid: p.name() for p in own_ray_processes(theirs) if theirs in " ".join(p.cmdline())}
        assert any("raylet" in n for n in daemons.values()) and own_ray_processes(ours)
        assert stop_own_ray(ours) > 0
        assert not own_ray_processes(ours)
        gone = {pid: name for pid, name in daemons.items() if not psutil.pid_exists(pid)}
        assert not gone, f"stopping our cluster ended the other one's {gone}"
        address, head_env, _, _ = ray_head  # and theirs still answers
        assert _run([RAY, "job", "list", "--address", address], head_env, timeout=60).returncode == 0
    finally:
        stop_own_ray(ours)
        shutil.rmtree(ours, ignore_errors=True)
