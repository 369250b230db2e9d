"""cluster/serve.yaml as `serve run` deploys it, on a real local Ray cluster this test starts (token
authentication on, as in every manifest) and stops: real HTTP to /healthz and /v1/score.

Only what a CPU box needs differs from the file: the trained RM (the quick world's), the replica's
resources (no GPU, half a CPU, float32, one replica) and the HTTP address (127.0.0.1, a free port).
The API key (serve.api_key_env) is kept and set, like the Ray token, on the cluster's nodes only."""

import base64
import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from ray_cleanup import stop_own_ray

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(seed: int) -> str:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _cpu_copy_of_serve_yaml(path: Path, rm: Path, port: int) -> dict:
    doc = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    doc["http_options"].update(host="127.0.0.1", port=port)
    (app,) = doc["applications"]
    app["args"]["reward"]["model_path"] = str(rm)
    app["args"]["resources"]["serve"] = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5, "num_gpus": 0,
                                         "dtype": "float32"}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return doc


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_serve_run_of_cluster_serve_yaml_answers_http(quick_world, tmp_path):
    port, gcs = _free_port(), _free_port()
    config = tmp_path / "serve.yaml"
    doc = _cpu_copy_of_serve_yaml(config, quick_world.reward, port)
    key_env = doc["applications"][0]["args"]["serve"]["api_key_env"]
    api_key, ray_token = secrets.token_hex(16), secrets.token_hex(32)
    # what every manifest gives its Ray processes: token mode and the token (from a Secret there)
    ray_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", key_env)}
    ray_env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=ray_token, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    temp_dir = tempfile.mkdtemp(prefix="caig-serve-", dir="/tmp")  # short: Ray's socket paths have a limit
    serve_run = None
    try:
        started = subprocess.run(
            [str(BIN / "ray"), "start", "--head", "--temp-dir", temp_dir, "--node-ip-address", "127.0.0.1",
             "--port", str(gcs), "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
             # every port this head listens on is free now: a second cluster on the host cannot collide
             "--dashboard-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
             "--ray-client-server-port", str(_free_port()),
             "--object-store-memory", str(200 * 1024 * 1024)],
            env={**ray_env, key_env: api_key}, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, (started.stdout + started.stderr)[-3000:]
        # `serve run` as a user runs it against the cluster: non-blocking, it submits the config and exits;
        # the cluster's Serve controller builds the application (with the nodes' environment)
        serve_run = subprocess.Popen(
            [str(BIN / "serve"), "run", "--address", f"127.0.0.1:{gcs}", "--non-blocking", str(config)],
            env=ray_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = serve_run.communicate(timeout=90)
        assert serve_run.returncode == 0 and "Submitted deploy config successfully" in out, out[-3000:]

        base = f"http://127.0.0.1:{port}"
        body = {"product": {"title": "red lipstick", "attributes": {"color": "red"}},
                "image_a": _png(1), "image_b": _png(2)}
        with httpx.Client(timeout=30) as client:
            deadline, health = time.monotonic() + 120, None
            while time.monotonic() < deadline:
                try:
                    health = client.get(f"{base}/healthz")
                    if health.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(1)
            assert health is not None and health.status_code == 200, health and health.text
            assert health.json()["status"] == "ok" and health.json()["model_path"] == str(quick_world.reward)
            assert client.post(f"{base}/v1/score", json=body).status_code == 401  # closed: no key, no score
            r = client.post(f"{base}/v1/score", json=body, headers={"Authorization": f"Bearer {api_key}"})
        assert r.status_code == 200, r.text
        got = r.json()
        for field in ("p_first_better", "p_first_better_debiased"):
            assert 0.0 <= got[field] <= 1.0, got
    finally:
        if serve_run is not None and serve_run.poll() is None:
            serve_run.kill()
            serve_run.wait(timeout=10)
        stop_own_ray(temp_dir)  # this cluster only: other Ray clusters on the host stay up
        shutil.rmtree(temp_dir, ignore_errors=True)
