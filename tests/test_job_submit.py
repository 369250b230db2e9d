"""Entrypoints as `ray job submit` runs them, against a real local head with the dashboard on
127.0.0.1 (RAY_AUTH_MODE pinned); the head (only it) is always stopped."""

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
        yield address, env, temp_dir
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
@pytest.mark.timeout(900)
def test_train_and_generate_jobs_succeed_on_a_real_head(ray_head, quick_world, tmp_path):
    address, env, _ = ray_head
    _submit(address, env, ["-m", "caig_ray.jobs.train_rm", "--preset", "quick", "--world", str(quick_world.root),
                           "--out", str(tmp_path / "rm"), "--epochs", "1", "--max-pairs", "16"])
    metrics = json.loads((tmp_path / "rm" / "train_metrics.json").read_text())
    assert metrics["step"] >= 1 and (tmp_path / "rm" / "config.json").is_file()
    from caig_ray.data import read_catalog, write_catalog

    shop = write_catalog(read_catalog(quick_world.catalog)[:6], tmp_path / "shop" / "catalog.json")
    _submit(address, env, ["-m", "caig_ray.jobs.generate", "--preset", "quick", "--catalog", str(shop), "--out",
                           str(tmp_path / "ads"), "--policy", str(quick_world.policy), "--rm", str(tmp_path / "rm"),
                           "--n", "2"])
    best = pq.read_table(tmp_path / "ads" / "best")
    assert best.num_rows == 6 and (tmp_path / "ads" / "gallery.html").is_file()


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
        address, head_env, _ = ray_head  # and theirs still answers
        assert _run([RAY, "job", "list", "--address", address], head_env, timeout=60).returncode == 0
    finally:
        stop_own_ray(ours)
        shutil.rmtree(ours, ignore_errors=True)
