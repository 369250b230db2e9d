import json
import os
import subprocess
import sys
import time
from pathlib import Path

from caig_ray.data import read_catalog, read_click_logs
from caig_ray.models.policy import load_policy
from caig_ray.models.reward import load_reward_model
from caig_ray.world import WorldLayout

CLI = [sys.executable, "-m", "caig_ray.jobs.cli"]
ROOT = Path(__file__).resolve().parents[1]


def test_make_world_cli_quick(tmp_path):
    t = time.perf_counter()
    res = subprocess.run(CLI + ["make-world", "--preset", "quick", "--out", str(tmp_path / "w")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t
    assert res.returncode == 0, res.stderr[-2000:]
    assert wall < 120
    lay = WorldLayout(tmp_path / "w")
    market = json.loads(lay.market.read_text())
    products = read_catalog(lay.catalog)
    logs = read_click_logs(lay.click_logs)
    assert len(products) == market["n_products"] == 40
    assert logs.num_rows == market["n_creatives"]
    assert set(logs.column("product_id").to_pylist()) == {p.id for p in products}
    assert 0.5 < market["bayes_ceiling"] < 1.0 and market["n_band_pairs"] > 0
    load_policy(lay.policy)
    load_reward_model(lay.reward)
    assert (lay.sd / "model_index.json").is_file() and (lay.controlnet / "config.json").is_file()


def test_cli_bad_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: quick\nmarket:\n  n_products: -3\n")
    res = subprocess.run(CLI + ["make-world", "--config", str(bad), "--out", str(tmp_path / "w")],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2
    assert "market.n_products" in res.stderr and str(bad) in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_lists_commands():
    res = subprocess.run(CLI + ["--help"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "make-world" in res.stdout and "demo" in res.stdout
    res = subprocess.run(CLI + ["frobnicate"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "unknown command" in res.stderr
