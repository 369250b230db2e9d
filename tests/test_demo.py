import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_end_to_end_on_quick_preset_with_another_ray_on_the_host(tmp_path):
    """The README's demo (quick preset) while a second Ray instance runs on this host (started and
    stopped here): the job's own processes are given its address, so Ray Train's helpers (pretrain-pm,
    train-rm) do not find two and fail; the log has no traceback, the Ray Train stages no error-level
    line, and stdout is the summary alone."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    other = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys, time; ray.init(address='local', num_cpus=1, include_dashboard=False);"
                               " print('up', flush=True); time.sleep(900)"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert other.stdout.readline().strip() == b"up"
        res = subprocess.run([sys.executable, "-m", "caig_ray.jobs.cli", "demo", "--preset", "quick", "--out", str(tmp_path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    finally:
        other.send_signal(signal.SIGINT)  # its driver shuts its own instance down on the way out
        try:
            other.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(other.pid, signal.SIGKILL)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "rm" / "train_metrics.json").read_text())["num_workers"] == 2
    # Ray's own error lines ("[2026-12-01 22:19:57,852 E 1072 1122] core_worker.cc...") and logging's ERROR,
    # from the start of pretrain-pm to the end of train-rm (both Ray Train jobs)
    ray_train = res.stderr[res.stderr.index("demo [3/6] pretrain-pm"):res.stderr.index("demo [5/6] evaluate-rm")]
    error_lines = [line for line in ray_train.splitlines()
                   if re.search(r"\[\d{4}-\d\d-\d\d [\d:,.]+ E \d+ \d+\]| ERROR ", line)]
    assert not error_lines, error_lines[:5]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert json.loads(res.stdout) == summary  # stdout is the summary alone; every log line went to stderr
    assert "Traceback" not in res.stderr and "multiple active Ray instances" not in res.stderr
    assert "demo [6/6] train: the online DPO+PCPO loop (2 rounds) done in" in res.stderr  # stage markers
    assert summary["n_products"] == 40 and 0.5 < summary["bayes_ceiling_all_band_pairs"] < 1.0
    assert 0.0 <= summary["bayes_ceiling_test_pairs"] <= 1.0  # both ceilings, each named by its pairs
    assert summary["stages_run"][-4:] == ["pretrain-pm", "train-rm", "evaluate-rm", "train"]
    for key in ("rm_accuracy_logged", "cnn_baseline_accuracy_logged", "pm_scene_word_share_after"):
        assert 0.0 <= summary[key] <= 1.0
    # the online loop's keys (issue: online loop, "done means")
    rounds = summary["eval_after_rounds"]
    assert rounds == list(range(0, 3)) and len(summary["true_ctr_by_round"]) == len(rounds)
    assert all(0 < c < 1 for c in summary["true_ctr_by_round"]) and len(summary["match_rate_by_round"]) == len(rounds)
    assert summary["pairs_lost"] == 0 and summary["pairs_duplicated"] == 0
    assert summary["pairs_trained"] + summary["pairs_skipped"] == summary["pairs_planned"] == 2 * 8
    assert 0 <= summary["pairs_skipped_tie"] <= summary["pairs_skipped"]  # ties are counted, by name
    assert summary["renderer_pool_size_max"] >= 1 and summary["demo_wall_s"] > summary["online_wall_s"] > 0
    assert (tmp_path / "online" / "report.html").exists()
    for png in ("market_ctr_heatmap.png", "history_ads.png", "renderers.png", "rm_accuracy.png"):
        head = (tmp_path / "plots" / png).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n"
