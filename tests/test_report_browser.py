"""The run report opened in headless Chromium (Debian's package, installed by the test set-up):
every image loads, the expected sections are there, and a screenshot is taken."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from caig_ray.imaging import png_bytes
from caig_ray.report import online_plots, write_run_report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _fake_run(run_dir):
    """A run folder with the shapes caig-ray train writes (2 rounds of 3 pairs, 3 evaluations)."""
    (run_dir / "pairs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for r in range(2):
        rows = []
        for k in range(3):
            ad = lambda: png_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))  # noqa: E731
            rows.append({"pair_id": f"train-r{r:03d}-p{k}", "round": r, "product_id": f"p{k}", "title": f"shoe {k}",
                         "desc_a": "bright stadium", "desc_b": "soft vanity", "ad_a": ad(), "ad_b": ad(),
                         "p_left_debiased": 0.7, "chosen": "a" if k else "", "status": "trained" if k else
                         "skipped:duplicate", "true_ctr_a": 0.04, "true_ctr_b": 0.03})
        pq.write_table(pa.Table.from_pylist(rows), run_dir / "pairs" / f"round_{r:03d}.parquet")
    lift = {"diff": 0.001, "ci95": [0.0, 0.002], "relative": 0.03, "n": 3}
    evals = [{"after_rounds": i, "true_ctr": 0.03 + 0.001 * i, "base_true_ctr": 0.03, "lift": lift,
              "match_rate": 0.9, "base_match_rate": 0.9, "rm_win_rate": 0.5 + 0.05 * i} for i in range(3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(
        {"kind": "train", "step": s, "loss": 1.3 - 0.1 * s, "rewards/margins": 0.1 * s}) + "\n" for s in range(1, 5)))
    online_plots(run_dir, [], evals, [(0.0, 1, 1), (1.0, 2, 1), (2.0, 1, 1)])
    (run_dir / "summary.json").write_text(json.dumps({"rounds": 2, "pairs_lost": 0, "wall_s": 1.5}))


def test_report_renders_in_chromium_with_every_image_loaded(tmp_path):
    from playwright.sync_api import sync_playwright

    run = tmp_path / "run"
    _fake_run(run)
    report = write_run_report(run)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        n_images = page.evaluate("document.images.length")
        broken = page.evaluate(
            "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)")
        sections = page.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)")
        round_headers = page.evaluate("Array.from(document.querySelectorAll('#rounds h3')).map(h => h.textContent)")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    # 3 plots + 2 rounds x 2 shown pairs x (chosen + rejected)
    assert n_images == 3 + 2 * 2 * 2 and broken == []
    assert sections == ["summary", "curves", "rounds"]
    assert [h.split(":")[0] for h in round_headers] == ["Round 0", "Round 1"]
    shot = np.asarray(Image.open(tmp_path / "report.png").convert("L"))
    assert shot.shape[0] > 900 and shot.std() > 10  # a full-page capture with content, not a blank page


def test_report_command_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from caig_ray.jobs.report import main

    assert main([str(tmp_path)]) == 2
    assert "not an online run folder" in capsys.readouterr().err
