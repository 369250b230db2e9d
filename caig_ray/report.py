"""Pictures people would rather see than read: plots (PNG) of the market, grids of ads, and an online
run's ``report.html`` (the result first, then the curves, the held-out ads, the training pairs).

Numbers on a page are written for people: rates and CTRs in percent with 3 significant digits,
seconds as seconds or minutes, paths relative to the run folder. Text from the models (descriptions,
titles) is cleaned where it is shown (``clean_text``): the tiny PM emits byte tokens, so a description
can hold U+FFFD (bytes that were not valid UTF-8) and control characters; those are removed and the
page says so (a "cleaned" mark with a title naming what was removed), the raw text stays in the parquet.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# text and numbers as a page shows them

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")  # C0/C1 controls, lone surrogates
_BREAKS = re.compile(r"[\t\n\r]+")
_REPLACEMENT = re.compile("\ufffd+")


def clean_text(text) -> tuple[str, str | None]:
    """``(shown, note)``: the text a page shows and, when something was removed, a note saying what.

    Bytes are decoded as UTF-8 with replacement; runs of U+FFFD (bytes that were not valid UTF-8),
    control characters and lone surrogates are removed; tabs and line breaks become spaces.
    ``note`` is None when the text needed no cleaning."""
    if text is None:
        return "", None
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", errors="replace")
    text = str(text)
    runs = _REPLACEMENT.findall(text)
    n_ctrl = len(_CONTROL.findall(text))
    shown = _BREAKS.sub(" ", _CONTROL.sub("", _REPLACEMENT.sub("", text)))
    removed = []
    if runs:
        n = sum(len(r) for r in runs)
        removed.append(f"{n} undecodable byte{'s' * (n != 1)} (U+FFFD, {len(runs)} run{'s' * (len(runs) != 1)})")
    if n_ctrl:
        removed.append(f"{n_ctrl} control character{'s' * (n_ctrl != 1)}")
    return shown, ("cleaned for display: removed " + " and ".join(removed)) if removed else None


def shown_html(text, source: str = "") -> str:
    """``text`` cleaned (``clean_text``) and escaped for HTML; cleaned text is wrapped in a
    ``<span class="cleaned">`` whose title says what was removed and where the raw text is."""
    shown, note = clean_text(text)
    if note is None:
        return html.escape(shown)
    tip = html.escape(note + (f"; the raw text is in {source}" if source else ""), quote=True)
    return f'<span class="cleaned" title="{tip}">{html.escape(shown)}<sup class="mark"> [cleaned]</sup></span>'


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _decimals(x: float) -> int:
    """Decimals that write ``x`` with 3 significant digits (0 to 3)."""
    a = abs(x)
    if not math.isfinite(a) or a == 0:
        return 2
    return min(3, max(0, 2 - math.floor(math.log10(a))))


def fmt_pct(x, decimals: int | None = None, sign: bool = False) -> str:
    """A rate (0..1) in percent, 3 significant digits unless ``decimals`` is given: 0.04243 -> "4.24%"."""
    if not _finite(x):
        return "n/a"
    v = 100 * x
    d = _decimals(v) if decimals is None else decimals
    return f"{v:+.{d}f}%" if sign else f"{v:.{d}f}%"


def fmt_pts(x, decimals: int) -> str:
    """A difference of two rates in percentage points, signed: 0.0052 -> "+0.52"."""
    return f"{100 * x:+.{decimals}f}" if _finite(x) else "n/a"


def fmt_num(x) -> str:
    """A number with 3 significant digits (no exponent); integers as they are."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if not _finite(x):
        return "n/a"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a == 0:
        return "0"
    return f"{x:.{min(6, max(0, 2 - math.floor(math.log10(a))))}f}"


def fmt_seconds(x) -> str:
    if not _finite(x):
        return "n/a"
    if x < 60:
        return f"{fmt_num(float(x))} s"
    if x < 3600:
        m, s = divmod(round(x), 60)
        return f"{m} min {s} s"
    h, m = divmod(round(x / 60), 60)
    return f"{h} h {m} min"


def fmt_lift(lift: dict, decimals: int) -> str:
    """``caig_ray.online.paired_lift``'s dict: "+0.52 pts [+0.32, +0.73] (95% CI), relative +14.0%, n 200"."""
    lo, hi = lift.get("ci95", [None, None])
    text = f"{fmt_pts(lift.get('diff'), decimals)} pts [{fmt_pts(lo, decimals)}, {fmt_pts(hi, decimals)}] (95% CI)"
    if "relative" in lift:
        text += f", relative {fmt_pct(lift['relative'], 1, sign=True)}"
    return text + (f", n {lift['n']}" if "n" in lift else "")


def relative_path(value: str, run_dir: Path) -> str:
    """A local path as seen from the run folder ("policy", "../rm"); object-store URIs as they are."""
    if "://" in value or not value.startswith(("/", "~")):
        return value
    path, run = Path(value).expanduser().resolve(), run_dir.resolve()
    try:
        return str(path.relative_to(run)) or "."
    except ValueError:
        return os.path.relpath(path, run)


_RATE = re.compile(r"(rate|ctr|accuracy|ceiling|share|chance)")


def fmt_value(key: str, value, run_dir: Path, ctr_decimals: int = 2) -> str:
    """One summary value written for people, by what its key names (rates in percent, seconds,
    paths relative to the run, the lift dict in points with its CI)."""
    if value is None:
        return "—"
    if isinstance(value, dict):
        if "diff" in value and "ci95" in value:
            return fmt_lift(value, ctr_decimals)
        if not value:
            return "none"
        return ", ".join(f"{k}: {fmt_value(key if 'times' not in key else k + '_s', v, run_dir, ctr_decimals)}"
                         for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt_value(key, v, run_dir, ctr_decimals) for v in value) if value else "none"
    if isinstance(value, str):
        shown, _ = clean_text(relative_path(value, run_dir))
        return shown
    if isinstance(value, bool) or isinstance(value, int):
        return fmt_num(value)
    if key.endswith("_s") or "_s_" in key:
        return fmt_seconds(value)
    if _RATE.search(key):
        return fmt_pct(value)
    return fmt_num(value)


# ---------------------------------------------------------------------------------------------------------
# plots

def _save(fig, path: str | Path) -> None:
    # bbox_inches="tight": the saved image grows to hold every label, title and legend
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def ctr_heatmap(rows: list[dict], path: str | Path, title: str = "mean true CTR by category x scene") -> Path:
    """Heatmap of mean true CTR per (category, scene) from market-truth rows; empty cells are blank."""
    cats = sorted({r["category"] for r in rows})
    scenes = sorted({r["scene"] for r in rows})
    grid = np.full((len(cats), len(scenes)), np.nan)
    for i, c in enumerate(cats):
        for j, s in enumerate(scenes):
            v = [r["true_ctr"] for r in rows if r["category"] == c and r["scene"] == s]
            grid[i, j] = np.mean(v) if v else np.nan
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(scenes), 1.0 + 0.6 * len(cats)), layout="constrained")
    im = ax.imshow(grid * 100, cmap="viridis")
    ax.set_xticks(range(len(scenes)), scenes, rotation=45, ha="right")
    ax.set_yticks(range(len(cats)), cats)
    for i in range(len(cats)):
        for j in range(len(scenes)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{100 * grid[i, j]:.1f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax, label="true CTR %")
    ax.set_title(title)
    _save(fig, path)
    return Path(path)


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (words kept whole where they fit)."""
    lines, line = [], ""
    for word in text.split():
        while draw.textlength(word) > width:  # a word wider than the cell: split it
            k = 1
            while k < len(word) and draw.textlength(word[:k + 1]) <= width:
                k += 1
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:k])
            word = word[k:]
        if not word:
            continue
        trial = f"{line} {word}".strip()
        if draw.textlength(trial) <= width:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def ad_grid(images: list[Image.Image], labels: list[str], path: str | Path, cols: int = 6, cell: int = 128) -> Path:
    """Ads in a grid, each with its whole label under it (wrapped to the cell's width, never cut)."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(probe, clean_text(label)[0], cell - 4) for label in labels]
    line_h = 12
    band = 4 + line_h * max([len(w) for w in wrapped] + [1])
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * (cell + band)), "white")
    d = ImageDraw.Draw(sheet)
    for k, (img, lines) in enumerate(zip(images, wrapped)):
        x, y = (k % cols) * cell, (k // cols) * (cell + band)
        sheet.paste(img.convert("RGB").resize((cell, cell)), (x, y))
        for i, line in enumerate(lines):
            d.text((x + 2, y + cell + 2 + i * line_h), line, fill="black")
    sheet.save(path)
    return Path(path)


def bar_chart(values: dict[str, float], path: str | Path, title: str, ylim: tuple[float, float] | None = None) -> Path:
    """One bar per named value, the value printed on top."""
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(values), 3.5), layout="constrained")
    bars = ax.bar(list(values), list(values.values()), color="#4a7ab5")
    for b, v in zip(bars, values.values()):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    _save(fig, path)
    return Path(path)


def _finish(fig, axes, xlabel: str, path: Path, integer_x: bool = False) -> str:
    """Label the x axes, add legends where there are labelled lines, save the PNG, close the figure."""
    for ax in np.atleast_1d(axes):
        ax.set_xlabel(xlabel)
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save(fig, path)
    return f"{path.parent.name}/{path.name}"


def online_plots(run_dir: str | Path, rounds: list[dict], evals: list[dict],
                 pool_trace: list[tuple[float, int, int]]) -> list[str]:
    """The online loop's curves from a run folder's metrics.jsonl and the round/eval records:
    plots/online_eval.png (true CTR, match rate, RM win rate by round), plots/online_training.png
    (loss and reward margins by step), plots/renderer_pool.png (pool sizes over time)."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    x = [e["after_rounds"] for e in evals]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3), layout="constrained")
    if evals and evals[0].get("true_ctr") is not None:
        axes[0].plot(x, [100 * e["true_ctr"] for e in evals], "o-", label="tuned PM")
        axes[0].plot(x, [100 * e["base_true_ctr"] for e in evals], "--", color="grey", label="pretrained PM")
        lo = [100 * (e["base_true_ctr"] + e["lift"]["ci95"][0]) for e in evals]
        hi = [100 * (e["base_true_ctr"] + e["lift"]["ci95"][1]) for e in evals]
        axes[0].fill_between(x, lo, hi, alpha=0.2, label="95% CI of the lift")
        pct = lambda v: np.nan if v is None else 100 * v  # noqa: E731 -- no ad set a scene: no match rate
        axes[1].plot(x, [pct(e["match_rate"]) for e in evals], "o-", label="tuned PM")
        axes[1].plot(x, [pct(e["base_match_rate"]) for e in evals], "--", color="grey", label="pretrained PM")
        if all(e["match_rate"] is None and e["base_match_rate"] is None for e in evals):
            axes[1].set_xlim(axes[0].get_xlim())  # nothing plotted: keep the rounds axis, and say why
            axes[1].text(0.5, 0.5, "no ad set a scene:\nno match rate", ha="center", va="center",
                         transform=axes[1].transAxes, color="grey")
    axes[0].set_title("true CTR % on held-out products")
    axes[1].set_title("match rate % (scene suits product)")
    axes[2].plot(x, [100 * e["rm_win_rate"] for e in evals], "o-")
    axes[2].axhline(50, color="grey", lw=0.8)
    axes[2].set_title("RM win rate % vs pretrained PM")
    written = [_finish(fig, axes, "rounds trained", plots / "online_eval.png", integer_x=True)]

    log = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    steps = [m for m in records if m["kind"] == "train"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
    s = [m["step"] for m in steps]
    for ax, keys in zip(axes, (("loss", "dpo/loss", "pcpo/loss"), ("rewards/margins", "pcpo/rewards/margins"))):
        for key in keys:
            if steps and key in steps[0]:
                ax.plot(s, [m[key] for m in steps], label=key)
    axes[0].set_title("loss by step")
    axes[1].set_title("reward margins by step")
    written.append(_finish(fig, axes, "train step", plots / "online_training.png", integer_x=True))

    fig, ax = plt.subplots(figsize=(6, 3), layout="constrained")
    if pool_trace:
        t = [p[0] for p in pool_trace]
        ax.step(t, [p[1] for p in pool_trace], where="post", label="renderers")
        ax.step(t, [p[2] for p in pool_trace], where="post", label="RM scorers")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("alive actors")
    ax.set_title("actor pool sizes")
    written.append(_finish(fig, ax, "seconds since the pools started", plots / "renderer_pool.png"))
    return written


# ---------------------------------------------------------------------------------------------------------
# the run report

_CAPTIONS = {
    "online_eval": "True CTR, match rate and RM win rate on the held-out products, tuned PM vs pretrained PM, "
                   "by rounds trained",
    "online_training": "DPO+PCPO loss and reward margins by train step",
    "renderer_pool": "Renderer and RM-scorer actors alive over the run",
}
# summary.json keys the report does not list in its details table (shown elsewhere, or not for people)
_NOT_LISTED = ("renderer_pool_trace", "plots", "report")


def _data_uri(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode()


def _with_ads(run_dir: Path, rows: list[dict]) -> list[dict]:
    """Rows whose ads the pipeline wrote to ``pairs/ads/<ads_part>`` get ``ad_a``/``ad_b`` from there
    (each part read once); rows that carry the bytes themselves are kept as they are; a row whose
    part is not there gets None (the page says the ad is not stored)."""
    import pyarrow.parquet as pq

    ads: dict[str, tuple] = {}
    for part in sorted({r["ads_part"] for r in rows if r.get("ads_part") and "ad_a" not in r}):
        if (run_dir / "pairs" / "ads" / part).is_file():
            for a in pq.read_table(run_dir / "pairs" / "ads" / part).to_pylist():
                ads[a["pair_id"]] = (a["ad_a"], a["ad_b"])
    return [r if "ad_a" in r else {**r, "ad_a": ads.get(r["pair_id"], (None, None))[0],
                                   "ad_b": ads.get(r["pair_id"], (None, None))[1]} for r in rows]


def _img(png: bytes | None, cls: str, alt: str) -> str:
    if not png:
        return f"<div class='noad {cls}'>ad not stored</div>"
    return f"<img class='{cls}' alt='{html.escape(alt, quote=True)}' src='{_data_uri(png)}'>"


def _last(values):
    return values[-1] if isinstance(values, list) and values else None


def _find_rm_eval(run_dir: Path, rm_eval: str | Path | None) -> Path | None:
    """The RM evaluation the headline quotes: ``rm_eval`` if given, else ``rm_eval.json`` in the run
    folder or beside it (``caig-ray demo`` writes ``<demo>/rm_eval.json`` next to ``<demo>/online``)."""
    if rm_eval is not None:
        return Path(rm_eval) if Path(rm_eval).is_file() else None
    for p in (run_dir / "rm_eval.json", run_dir.parent / "rm_eval.json"):
        if p.is_file():
            return p
    return None


def _match_rate(rows: list[dict], side: str):
    scened = [r for r in rows if r.get(f"has_scene_{side}")]
    return float(np.mean([bool(r[f"match_{side}"]) for r in scened])) if scened else None


def _headline(summary: dict, final_eval: list[dict], rm_ev: dict | None, rm_ev_path: str | None) -> tuple[str, int]:
    """The result in words and numbers (each number in an element with an id), and the decimals the
    CTRs were written with."""
    items = []
    after, n_rounds = _last(summary.get("eval_after_rounds")), summary.get("rounds")
    tuned, lift = _last(summary.get("true_ctr_by_round")), summary.get("true_ctr_lift")
    base = _last(summary.get("base_true_ctr_by_round"))
    if base is None and _finite(tuned) and isinstance(lift, dict) and _finite(lift.get("diff")):
        base = tuned - lift["diff"]  # the lift is the mean paired difference: mean(tuned) - mean(pretrained)
    d = _decimals(100 * max(abs(tuned), abs(base))) if _finite(tuned) and _finite(base) else 2
    when = f"after {after} round{'s' * (after != 1)} trained" if after is not None else "at the last evaluation"
    n = lift.get("n") if isinstance(lift, dict) else None
    on = f"on {n} held-out products" if n else "on the held-out products"
    if _finite(tuned):
        text = (f"True CTR {on}, {when}: tuned PM <b id='h-tuned-ctr'>{fmt_pct(tuned, d)}</b> vs pretrained PM "
                f"<b id='h-base-ctr'>{fmt_pct(base, d)}</b>")
        if isinstance(lift, dict):
            lo, hi = lift["ci95"]
            verdict = "excludes" if lo > 0 or hi < 0 else "includes"
            text += (f", <b id='h-lift'>{fmt_pts(lift['diff'], d)} pts</b> <span id='h-lift-ci'>"
                     f"[{fmt_pts(lo, d)}, {fmt_pts(hi, d)}]</span> (95% CI, paired over products; it {verdict} 0)")
            if "relative" in lift:
                text += f", relative <span id='h-lift-rel'>{fmt_pct(lift['relative'], 1, sign=True)}</span>"
        items.append(f"<p class='big' id='h-ctr'>{text}</p>")
    else:
        items.append("<p class='big' id='h-ctr'>No true CTR: the run was not on the simulated market "
                     "(only the RM's preference is measured).</p>")
    li = []
    match, base_match = _last(summary.get("match_rate_by_round")), _last(summary.get("base_match_rate_by_round"))
    if base_match is None and final_eval:
        base_match = _match_rate(final_eval, "b")
    if _finite(match):
        li.append(f"Match rate (of the ads that set a scene, the share whose scene suits the product): tuned "
                  f"<b id='h-match'>{fmt_pct(match)}</b> vs pretrained <b id='h-base-match'>{fmt_pct(base_match)}</b>")
    win = _last(summary.get("rm_win_rate_by_round"))
    if _finite(win):
        li.append(f"RM win rate: the reward model prefers the tuned PM's ad to the pretrained PM's with mean "
                  f"probability <b id='h-rm-win'>{fmt_pct(win)}</b> (50% = no preference)")
    if rm_ev:
        ceiling = rm_ev.get("bayes_ceiling_test_pairs", rm_ev.get("bayes_ceiling"))
        text = (f"Reward model: pairwise accuracy <b id='h-rm-acc'>{fmt_pct(rm_ev.get('rm_accuracy_logged'))}</b> vs "
                f"CNN baseline <b id='h-cnn-acc'>{fmt_pct(rm_ev.get('cnn_baseline_accuracy_logged'))}</b> on "
                f"{rm_ev.get('n_test_pairs', '?')} held-out band pairs (logged order; chance 50%")
        if _finite(ceiling):
            text += f", Bayes ceiling on these pairs <span id='h-ceiling'>{fmt_pct(ceiling)}</span>"
        li.append(text + f"; from {html.escape(rm_ev_path or 'rm_eval.json')})")
    else:
        li.append("Reward model accuracy: no rm_eval.json in or beside the run folder (caig-ray evaluate-rm writes "
                  "it; caig-ray report --rm-eval PATH names one)")
    wall = summary.get("online_wall_s", summary.get("wall_s"))
    run = [f"{n_rounds} rounds" if n_rounds is not None else None,
           f"{summary['steps']} train steps" if "steps" in summary else None,
           f"{summary['pairs_trained']} of {summary['pairs_planned']} planned pairs trained"
           if "pairs_trained" in summary and "pairs_planned" in summary else None,
           f"{summary['pairs_lost']} lost" if "pairs_lost" in summary else None,
           f"online loop {fmt_seconds(wall)}" if _finite(wall) else None]
    if any(run):
        li.append("Run: " + ", ".join(r for r in run if r))
    return "".join(items) + "<ul>" + "".join(f"<li>{x}</li>" for x in li) + "</ul>", d


def _held_out(run_dir: Path, rows: list[dict], source: str, after: int, per_eval: int, d: int) -> str:
    """The final evaluation's products: the tuned PM's ad beside the pretrained PM's (same render seed),
    each with its description and true CTR, and the RM's preference."""
    shown = _with_ads(run_dir, rows[:per_eval])
    parts = [f"<p>{source}: after {after} round{'s' * (after != 1)} trained, {len(rows)} held-out products, "
             f"{len(shown)} shown. Left: the tuned PM's ad; right: the pretrained PM's (the same render seed). "
             "A green outline marks the ad with the higher true CTR.</p>"]
    for r in shown:
        p_tuned = r.get("p_left_debiased", r.get("p_left"))
        ctr = {s: r.get(f"true_ctr_{s}") for s in ("a", "b")}
        better = None
        if _finite(ctr["a"]) and _finite(ctr["b"]) and ctr["a"] != ctr["b"]:
            better = "a" if ctr["a"] > ctr["b"] else "b"
        head = f"RM P(tuned better) {fmt_pct(p_tuned)}" if _finite(p_tuned) else "RM not scored"
        if better:
            head += f" · true CTR tuned − pretrained {fmt_pts(ctr['a'] - ctr['b'], d)} pts"
        cells = []
        for side, cls, label in (("a", "tuned", "tuned PM"), ("b", "base", "pretrained PM")):
            c = f" · true CTR {fmt_pct(ctr[side], d)}" if _finite(ctr[side]) else ""
            win = " win" if better == side else ""
            cells.append(f"<div class='side {cls}'>{_img(r.get(f'ad_{side}'), cls + win, label)}<br>"
                         f"<b>{label}</b>{c}<br><span class='desc'>{shown_html(r.get(f'desc_{side}'), source)}</span>"
                         "</div>")
        parts.append(f"<div class='pair product' data-product='{html.escape(str(r.get('product_id')), quote=True)}'>"
                     f"<b>{shown_html(r.get('title'), source)}</b> <small>{shown_html(r.get('product_id'))}</small>"
                     f"<br>{head}<br>{''.join(cells)}</div>")
    return "".join(parts)


def _details_table(values: dict, run_dir: Path, d: int, skip=()) -> str:
    rows = "".join(f"<tr><th><code>{html.escape(k)}</code></th><td>{html.escape(fmt_value(k, v, run_dir, d))}</td></tr>"
                   for k, v in values.items() if k not in skip)
    return f"<table>{rows}</table>"


def write_run_report(run_dir: str | Path, per_round: int = 12, per_eval: int = 24,
                     rm_eval: str | Path | None = None) -> Path:
    """``report.html`` for an online run folder, self-contained (images inlined), the result first:

    1. ``#headline``: true CTR tuned vs pretrained with the lift's 95% CI, match rate, RM win rate (the
       last evaluation, from summary.json) and the RM's accuracy vs the CNN baseline (rm_eval.json: ``rm_eval``,
       else in the run folder or beside it);
    2. ``#curves``: plots/*.png;
    3. ``#heldout``: the last evaluation's held-out products (pairs/eval_XXX.parquet), up to ``per_eval``,
       the tuned PM's ad beside the pretrained PM's with true CTR and RM preference;
    4. ``#rounds``: per round, up to ``per_round`` trained pairs, chosen and rejected ads;
    5. ``#details``: every other summary.json value (and rm_eval.json's), formatted for people."""
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    ev_path = _find_rm_eval(run_dir, rm_eval)
    rm_ev = json.loads(ev_path.read_text()) if ev_path else None
    ev_shown = relative_path(str(ev_path.resolve()), run_dir) if ev_path else None
    eval_files = sorted((run_dir / "pairs").glob("eval_*.parquet"))
    final_eval = pq.read_table(eval_files[-1]).to_pylist() if eval_files else []
    headline, d = _headline(summary, final_eval, rm_ev, ev_shown)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>caig-ray run report: {html.escape(run_dir.resolve().name)}</title><style>"
        "body{font-family:sans-serif;margin:1.2em;max-width:1400px}h2{border-bottom:1px solid #ccc}"
        ".big{font-size:18px}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;"
        "padding:3px 6px;text-align:left}th{font-weight:normal}"
        ".pair{display:inline-block;vertical-align:top;width:330px;margin:6px;font-size:11px;border:1px solid #eee;"
        "padding:4px}.pair img,.noad{width:150px;height:150px}.noad{background:#eee;display:flex;"
        "align-items:center;justify-content:center}.side{display:inline-block;width:160px;vertical-align:top}"
        ".ch,.win{outline:3px solid #2a2}.rj{outline:3px solid #c33}.cleaned .mark{color:#a60}"
        ".plots img{max-width:100%}</style></head><body>"
        f"<h1>caig-ray online run <small>{html.escape(run_dir.resolve().name)}</small></h1>",
        f"<section id='headline'><h2>Result</h2>{headline}</section>",
        "<section id='curves' class='plots'><h2>Curves</h2>",
    ]
    for png in sorted((run_dir / "plots").glob("*.png")):
        caption = _CAPTIONS.get(png.stem, png.stem.replace("_", " "))
        parts.append(f"<figure><img alt='{html.escape(png.stem)}' src='{_data_uri(png.read_bytes())}'>"
                     f"<figcaption>{html.escape(caption)} (plots/{html.escape(png.name)})</figcaption></figure>")
    parts.append("</section><section id='heldout'><h2>Held-out products: tuned PM vs pretrained PM</h2>")
    if final_eval:
        f = eval_files[-1]
        parts.append(_held_out(run_dir, final_eval, f"pairs/{f.name}", int(f.stem.split("_")[1]), per_eval, d))
    else:
        parts.append("<p>No evaluation was written (pairs/eval_*.parquet).</p>")
    parts.append("</section><section id='rounds'><h2>Training pairs by round: chosen (green) and rejected (red) "
                 "ads</h2><p>Descriptions marked [cleaned] had undecodable bytes or control characters removed "
                 "for display (hover for what); the raw text is in the round's parquet.</p>")
    for f in sorted((run_dir / "pairs").glob("round_*.parquet")):
        rows = pq.read_table(f).to_pylist()
        shown = _with_ads(run_dir, [r for r in rows if r.get("chosen") in ("a", "b")][:per_round])
        source = f"pairs/{f.name}"
        n_trained = sum(r["status"] == "trained" for r in rows)
        parts.append(f"<h3 id='{f.stem}'>Round {int(f.stem.split('_')[1])}: {len(rows)} pairs, {n_trained} trained, "
                     f"{len(rows) - n_trained} not trained</h3>")
        for r in shown:
            c, j = r["chosen"], "b" if r["chosen"] == "a" else "a"
            p_a = r.get("p_left_debiased", r.get("p_left"))
            p_c = (p_a if c == "a" else 1 - p_a) if _finite(p_a) else None
            cells = []
            for side, cls, label in ((c, "ch", "chosen"), (j, "rj", "rejected")):
                ctr = f" · true CTR {fmt_pct(r[f'true_ctr_{side}'])}" if _finite(r.get(f"true_ctr_{side}")) else ""
                cells.append(f"<div class='side'>{_img(r.get(f'ad_{side}'), cls, label)}<br>"
                             f"<b>{label}</b>{ctr}<br><span class='desc'>{shown_html(r.get(f'desc_{side}'), source)}"
                             "</span></div>")
            parts.append(f"<div class='pair'><b>{shown_html(r.get('title'), source)}</b> "
                         f"<small>{shown_html(r.get('product_id'))}</small><br>"
                         f"RM P(chosen better) {fmt_pct(p_c)}<br>{''.join(cells)}</div>")
    parts.append("</section><section id='details'><h2>Run details</h2><p>summary.json (paths relative to the "
                 "run folder)</p>")
    parts.append(_details_table(summary, run_dir, d, _NOT_LISTED))
    if rm_ev:
        parts.append(f"<p>{html.escape(ev_shown)}</p>" + _details_table(rm_ev, run_dir, d))
    parts.append("</section></body></html>")
    path = run_dir / "report.html"
    path.write_text("".join(parts), encoding="utf-8")
    return path
