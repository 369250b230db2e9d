"""The run report opened in headless Chromium (Debian's package, installed by the test set-up): the
result comes first and its numbers are summary.json's, written for people; every image loads; the
held-out products show the tuned and the pretrained ad side by side; text that is not valid UTF-8 is
shown cleaned and marked. And the generate gallery's near-tie marking."""

import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from caig_ray.imaging import png_bytes
from caig_ray.report import clean_text, fmt_pct, fmt_seconds, online_plots, write_run_report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# what the tiny PM's byte tokens give: invalid UTF-8 decoded with replacement, and a control character
DIRTY = b"g\xc3\xbc\xff\xfeberpsside\x07 shoe".decode("utf-8", errors="replace")
N_EVAL = 4


def _ad(rng):
    return png_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))


def _fake_run(run_dir):
    """A run folder with the shapes caig-ray train writes (2 rounds of 3 pairs, 3 evaluations of
    N_EVAL held-out products, summary.json with every key caig_ray.loop.summary.run_summary writes) and an
    rm_eval.json beside it, as caig-ray demo lays them out. Round 0 carries its ads in the rows,
    round 1 and the evaluations in pairs/ads/ parts (as the pipeline writes them)."""
    (run_dir / "pairs" / "ads").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for r in range(2):
        rows, ads = [], []
        for k in range(3):
            row = {"pair_id": f"train-r{r:03d}-p{k}", "round": r, "product_id": f"p{k}", "title": f"shoe {k}",
                   "desc_a": "bright stadium", "desc_b": DIRTY if (r, k) == (0, 1) else "soft vanity",
                   "p_left": 0.69, "p_left_debiased": 0.7, "chosen": "a" if k else "",
                   "status": "trained" if k else "skipped:duplicate", "true_ctr_a": 0.04, "true_ctr_b": 0.03}
            if r == 0:
                row.update(ad_a=_ad(rng), ad_b=_ad(rng))
            else:
                row["ads_part"] = f"train-r{r:03d}.parquet"
                ads.append({"pair_id": row["pair_id"], "ad_a": _ad(rng), "ad_b": _ad(rng)})
            rows.append(row)
        pq.write_table(pa.Table.from_pylist(rows), run_dir / "pairs" / f"round_{r:03d}.parquet")
        if ads:
            pq.write_table(pa.Table.from_pylist(ads), run_dir / "pairs" / "ads" / f"train-r{r:03d}.parquet")
    # the final evaluation: tuned 4.24%, pretrained 3.72%, lift +0.52 pts [+0.32, +0.73] (16-digit floats)
    base, diff = 0.037212345678901234, 0.0052123456789012345
    lift = {"diff": diff, "ci95": [0.0032123456789012345, 0.0073456789012345678], "relative": diff / base, "n": N_EVAL}
    evals = [{"after_rounds": i, "true_ctr": base + diff * i / 2, "base_true_ctr": base,
              "lift": {**lift, "diff": diff * i / 2}, "match_rate": 0.8 + 0.05 * i, "base_match_rate": 0.75,
              "rm_win_rate": 0.5 + 0.05678901234567 * i} for i in range(3)]
    for e in evals:
        rows, ads = [], []
        for k in range(N_EVAL):
            pid = f"e{k}"
            rows.append({"pair_id": f"eval-e{e['after_rounds']:03d}-{pid}", "kind": "eval", "round": e["after_rounds"],
                         "product_id": pid, "title": f"held-out bag {k}", "category": "bags",
                         "desc_a": f"tuned scene {k}", "desc_b": DIRTY if k == 0 else f"pretrained scene {k}",
                         "p_left": 0.6, "p_left_debiased": 0.61234567890123, "ads_part": f"eval-{e['after_rounds']}.parquet",
                         "true_ctr_a": 0.045 + 0.001 * k, "true_ctr_b": 0.035 + 0.001 * k,
                         "match_a": True, "match_b": k % 4 != 0, "has_scene_a": True, "has_scene_b": True})
            ads.append({"pair_id": rows[-1]["pair_id"], "ad_a": _ad(rng), "ad_b": _ad(rng)})
        pq.write_table(pa.Table.from_pylist(rows), run_dir / "pairs" / f"eval_{e['after_rounds']:03d}.parquet")
        pq.write_table(pa.Table.from_pylist(ads), run_dir / "pairs" / "ads" / f"eval-{e['after_rounds']}.parquet")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(
        {"kind": "train", "step": s, "loss": 1.3 - 0.1 * s, "rewards/margins": 0.1 * s}) + "\n" for s in range(1, 5)))
    trace = [(0.0, 1, 1), (1.0, 2, 1), (2.0, 1, 1)]
    plots = online_plots(run_dir, [], evals, trace)
    summary = {
        "rounds": 2, "steps": 4, "true_ctr_by_round": [e["true_ctr"] for e in evals],
        "base_true_ctr_by_round": [e["base_true_ctr"] for e in evals],
        "match_rate_by_round": [e["match_rate"] for e in evals],
        "base_match_rate_by_round": [e["base_match_rate"] for e in evals], "rm_win_rate_by_round": [e["rm_win_rate"] for e in evals],
        "eval_after_rounds": [0, 1, 2], "pairs_planned": 6, "pairs_rendered": 6, "pairs_scored": 6, "pairs_trained": 4,
        "pairs_skipped": 2, "pairs_lost": 0, "pairs_skipped_tie": 0, "pairs_skipped_duplicate": 2, "pairs_duplicated": 0,
        "renderer_pool_size_max": 2, "renderer_pool_trace": trace, "pool_sample_errors": 0, "max_policy_lag": 1,
        "policy_lag_steps_max": 1, "driver_wait_s": 0.49999999165534975, "render_busy_s": 12.345678901234567,
        "train_s": 3.1415926535897931, "pipeline": "streaming", "online_wall_s": 101.23456789012345,
        "policy_path": str((run_dir / "policy").resolve()), "recoveries": 0, "recoveries_by_kind": {},
        "storage": str(run_dir.resolve()), "true_ctr_lift": evals[-1]["lift"], "plots": plots, "report": "report.html",
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    rm_eval = {"n_train_pairs": 120, "n_test_pairs": 37, "chance": 0.5, "rm_score_s": 1.2345678901234,
               "rm_accuracy_logged": 0.6123456789012345, "rm_debiased_accuracy_logged": 0.6234567890123456,
               "cnn_train_s": 2.3456789012345, "cnn_baseline_accuracy_logged": 0.5843210987654321,
               "bayes_ceiling_test_pairs": 0.8267123456789012, "rm_accuracy_true": 0.64, "rm_debiased_accuracy_true": 0.65,
               "cnn_baseline_accuracy_true": 0.59}
    (run_dir.parent / "rm_eval.json").write_text(json.dumps(rm_eval))
    return summary, rm_eval


def test_report_renders_in_chromium_with_the_result_first(tmp_path):
    from playwright.sync_api import sync_playwright

    run = tmp_path / "run"
    summary, rm_eval = _fake_run(run)
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
        headline = {k: page.inner_text(f"#h-{k}") for k in (
            "tuned-ctr", "base-ctr", "lift", "lift-ci", "lift-rel", "match", "base-match", "rm-win", "rm-acc",
            "cnn-acc", "ceiling")}
        headline_text = page.inner_text("#headline")
        round_headers = page.evaluate("Array.from(document.querySelectorAll('#rounds h3')).map(h => h.textContent)")
        products = page.evaluate("""Array.from(document.querySelectorAll('#heldout .product')).map(p => ({
            id: p.dataset.product,
            tuned: Array.from(p.querySelectorAll('img.tuned')).filter(i => i.naturalWidth > 0).length,
            base: Array.from(p.querySelectorAll('img.base')).filter(i => i.naturalWidth > 0).length,
            text: p.innerText}))""")
        cleaned = page.evaluate("Array.from(document.querySelectorAll('.cleaned')).map(c => ({"
                                "text: c.innerText, title: c.title, in: c.closest('section').id}))")
        body = page.inner_text("body")
        titles = " ".join(page.evaluate("Array.from(document.querySelectorAll('[title]')).map(e => e.title)"))
        details = dict(page.evaluate(
            "Array.from(document.querySelectorAll('#details tr')).map(r => [r.cells[0].innerText, r.cells[1].innerText])"))
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()

    # the result first, then the curves, the held-out ads, the training pairs, the details
    assert sections == ["headline", "curves", "heldout", "rounds", "details"]
    # the headline's numbers are summary.json's (and rm_eval.json's), as people read them
    tuned, lift = summary["true_ctr_by_round"][-1], summary["true_ctr_lift"]
    pct = lambda x, d: f"{100 * x:.{d}f}%"  # noqa: E731
    assert headline["tuned-ctr"] == pct(tuned, 2) == "4.24%"
    assert headline["base-ctr"] == pct(summary["base_true_ctr_by_round"][-1], 2) == pct(tuned - lift["diff"], 2) == "3.72%"
    assert headline["lift"] == f"{100 * lift['diff']:+.2f} pts" == "+0.52 pts"
    assert headline["lift-ci"] == f"[{100 * lift['ci95'][0]:+.2f}, {100 * lift['ci95'][1]:+.2f}]" == "[+0.32, +0.73]"
    assert headline["lift-rel"] == f"{100 * lift['relative']:+.1f}%" == "+14.0%"
    assert headline["match"] == pct(summary["match_rate_by_round"][-1], 1) == "90.0%"
    assert headline["base-match"] == pct(summary["base_match_rate_by_round"][-1], 1) == "75.0%"
    assert headline["rm-win"] == pct(summary["rm_win_rate_by_round"][-1], 1) == "61.4%"
    assert headline["rm-acc"] == pct(rm_eval["rm_accuracy_logged"], 1) == "61.2%"
    assert headline["cnn-acc"] == pct(rm_eval["cnn_baseline_accuracy_logged"], 1) == "58.4%"
    assert headline["ceiling"] == pct(rm_eval["bayes_ceiling_test_pairs"], 1) == "82.7%"
    assert f"on {N_EVAL} held-out products" in headline_text and "after 2 rounds trained" in headline_text
    assert "37 held-out band pairs" in headline_text and "../rm_eval.json" in headline_text
    assert f"online loop {fmt_seconds(summary['online_wall_s'])}" in headline_text and fmt_seconds(101.2) == "1 min 41 s"
    # no raw float, no JSON quoting, no absolute path anywhere on the page
    page_text = body + " " + titles
    assert not re.search(r"\d\.\d{6,}", page_text), re.findall(r"\d\.\d{6,}", page_text)
    html_text = report.read_text(encoding="utf-8")
    assert str(tmp_path) not in html_text and str(tmp_path.resolve()) not in html_text
    assert not re.search(r"(?<![\w.])/(tmp|home|work|root|usr|var|mnt)/", page_text)
    assert details["policy_path"] == "policy" and details["storage"] == "." and details["pipeline"] == "streaming"
    assert details["driver_wait_s"] == "0.500 s" and details["true_ctr_by_round"] == "3.72%, 3.98%, 4.24%"
    assert details["true_ctr_lift"] == "+0.52 pts [+0.32, +0.73] (95% CI), relative +14.0%, n 4"
    assert details["recoveries_by_kind"] == "none" and "renderer_pool_trace" not in details
    # held-out products: the tuned and the pretrained ad side by side, each loaded, with true CTR and RM preference
    assert [p["id"] for p in products] == [f"e{k}" for k in range(N_EVAL)]
    assert all(p["tuned"] == 1 and p["base"] == 1 for p in products)
    assert "RM P(tuned better) 61.2%" in products[1]["text"] and "true CTR 4.60%" in products[1]["text"]
    assert "true CTR 3.60%" in products[1]["text"] and "tuned − pretrained +1.00 pts" in products[1]["text"]
    # 3 plots + 2 rounds x 2 shown pairs x (chosen + rejected) + held-out products x (tuned + pretrained)
    assert n_images == 3 + 2 * 2 * 2 + 2 * N_EVAL and broken == []
    assert [h.split(":")[0] for h in round_headers] == ["Round 0", "Round 1"]
    # text that was not valid UTF-8 (and a control character) is shown cleaned, and says so
    assert {c["in"] for c in cleaned} == {"heldout", "rounds"}
    for c in cleaned:
        assert c["text"].startswith("güberpsside shoe") and "[cleaned]" in c["text"]
        assert "cleaned for display" in c["title"] and "U+FFFD" in c["title"] and "control character" in c["title"]
    assert "\ufffd" not in html_text and not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", html_text)
    shot = np.asarray(Image.open(tmp_path / "report.png").convert("L"))
    assert shot.shape[0] > 900 and shot.std() > 10  # a full-page capture with content, not a blank page


def test_clean_text_and_number_formats():
    assert clean_text(b"g\xc3\xbc\xff\xfeberpsside\x07") == (
        "güberpsside", "cleaned for display: removed 2 undecodable bytes (U+FFFD, 1 run) and 1 control character")
    assert clean_text("plain\ttext") == ("plain text", None) and clean_text(None) == ("", None)
    assert [fmt_pct(x) for x in (0.042412, 0.61234, 1.0, 0.0012345)] == ["4.24%", "61.2%", "100%", "0.123%"]
    assert fmt_seconds(0.49999999165534975) == "0.500 s" and fmt_seconds(7322) == "2 h 2 min"


def test_report_without_market_or_rm_eval_says_so(tmp_path):
    run = tmp_path / "run"
    (run / "pairs").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"rounds": 1, "rm_win_rate_by_round": [0.5, 0.55],
                                                  "true_ctr_by_round": [None, None], "eval_after_rounds": [0, 1]}))
    page = write_run_report(run).read_text(encoding="utf-8")
    assert "No true CTR" in page and "no rm_eval.json" in page and "<b id='h-rm-win'>55.0%</b>" in page
    assert "No evaluation was written" in page


def test_report_command_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from caig_ray.jobs.report import main

    assert main([str(tmp_path)]) == 2
    assert "not an online run folder" in capsys.readouterr().err


# ---- the generate gallery: near-ties are ties, not "best"

def test_near_tie_places():
    from caig_ray.jobs.generate import GALLERY_TIE_GAP, near_tie_places

    assert GALLERY_TIE_GAP == 0.01
    assert near_tie_places([0.514, 0.506]) == [(1, True), (1, True)]  # printed 51.4% / 50.6%: within 1 point
    assert near_tie_places([0.51, 0.51]) == [(1, True), (1, True)]
    assert near_tie_places([0.8, 0.2]) == [(1, False), (2, False)]
    assert near_tie_places([0.52, 0.51]) == [(1, False), (2, False)]  # a 1-point gap is a difference
    assert near_tie_places([0.6, 0.595, 0.3]) == [(1, True), (1, True), (3, False)]
    assert near_tie_places([1.0]) == [(1, False)]


def test_gallery_marks_near_ties_not_best(tmp_path):
    from caig_ray.jobs.generate import write_gallery

    rows = []
    for pid, rates in (("tie", [0.514, 0.506]), ("clear", [0.8, 0.2])):
        for k, w in enumerate(rates):
            rows.append({"product_id": pid, "catalog_row": 0, "title": f"product {pid}", "candidate": k,
                         "description": DIRTY if pid == "tie" and k == 1 else f"scene {k}", "duplicate": False,
                         "seed": 1, "win_rate": w, "ctr": 0.03, "rank": k, "ad_path": f"ads/{pid}_{k}.png"})
    for sub, part in (("best", [r for r in rows if r["rank"] == 0]), ("candidates", rows)):
        (tmp_path / sub).mkdir()
        pq.write_table(pa.Table.from_pylist(part), tmp_path / sub / "part-0.parquet")
    write_gallery(tmp_path)
    page = (tmp_path / "gallery.html").read_text(encoding="utf-8")
    cards = dict(re.findall(r"<section><h2>product (\w+) .*?</h2>(.*?)</section>", page))
    assert re.findall(r'<figure class="(\w+)"', cards["tie"]) == ["tie", "tie"]
    assert "#1 (tie) · win rate 51.4%" in cards["tie"] and "#1 (tie) · win rate 50.6%" in cards["tie"]
    assert "best" not in cards["tie"]
    assert re.findall(r'<figure class="(\w+)"', cards["clear"]) == ["best", "cand"]
    assert "#1 best · win rate 80.0%" in cards["clear"] and "#2 · win rate 20.0%" in cards["clear"]
    assert "differ by less than 1 point" in page  # the threshold is stated on the page
    assert "\ufffd" not in page and "güberpsside shoe" in page and 'class="cleaned"' in page
