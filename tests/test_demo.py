import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_end_to_end_on_quick_preset(tmp_path):
    res = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--preset", "quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_products"] == 40 and 0.5 < summary["rm_bayes_ceiling"] < 1.0
    assert summary["stages_run"][-3:] == ["pretrain-pm", "train-rm", "evaluate-rm"]
    for key in ("rm_pair_accuracy", "rm_baseline_accuracy", "pm_scene_word_share_after"):
        assert 0.0 <= summary[key] <= 1.0
    for png in ("market_ctr_heatmap.png", "history_ads.png", "renderers.png", "rm_accuracy.png"):
        head = (tmp_path / "plots" / png).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n"
