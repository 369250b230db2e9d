import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_end_to_end_on_quick_preset(tmp_path):
    res = subprocess.run([sys.executable, "-m", "caig_ray.jobs.cli", "demo", "--preset", "quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
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
