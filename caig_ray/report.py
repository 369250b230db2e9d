"""Pictures people would rather see than read: plots (PNG) of the market and grids of ads."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402


def ctr_heatmap(rows: list[dict], path: str | Path, title: str = "mean true CTR by category x scene") -> Path:
    """Heatmap of mean true CTR per (category, scene) from market-truth rows; empty cells are blank."""
    cats = sorted({r["category"] for r in rows})
    scenes = sorted({r["scene"] for r in rows})
    grid = np.full((len(cats), len(scenes)), np.nan)
    for i, c in enumerate(cats):
        for j, s in enumerate(scenes):
            v = [r["true_ctr"] for r in rows if r["category"] == c and r["scene"] == s]
            grid[i, j] = np.mean(v) if v else np.nan
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(scenes), 1.0 + 0.6 * len(cats)))
    im = ax.imshow(grid * 100, cmap="viridis")
    ax.set_xticks(range(len(scenes)), scenes, rotation=45, ha="right")
    ax.set_yticks(range(len(cats)), cats)
    for i in range(len(cats)):
        for j in range(len(scenes)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{100 * grid[i, j]:.1f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax, label="CTR %")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def ad_grid(images: list[Image.Image], labels: list[str], path: str | Path, cols: int = 6, cell: int = 128) -> Path:
    """Ads in a grid, each with a one-line label under it."""
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * (cell + 14)), "white")
    d = ImageDraw.Draw(sheet)
    for k, (img, label) in enumerate(zip(images, labels)):
        x, y = (k % cols) * cell, (k // cols) * (cell + 14)
        sheet.paste(img.convert("RGB").resize((cell, cell)), (x, y))
        d.text((x + 2, y + cell + 1), label[: cell // 6], fill="black")
    sheet.save(path)
    return Path(path)


def bar_chart(values: dict[str, float], path: str | Path, title: str, ylim: tuple[float, float] | None = None) -> Path:
    """One bar per named value, the value printed on top."""
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(values), 3.5))
    bars = ax.bar(list(values), list(values.values()), color="#4a7ab5")
    for b, v in zip(bars, values.values()):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _finish(fig, axes, xlabel: str, path: Path) -> str:
    """Label the x axes, add legends where there are labelled lines, save the PNG, close the figure."""
    for ax in np.atleast_1d(axes):
        ax.set_xlabel(xlabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"{path.parent.name}/{path.name}"


def online_plots(run_dir: str | Path, rounds: list[dict], evals: list[dict],
                 pool_trace: list[tuple[float, int, int]]) -> list[str]:
    """The online loop's curves from a run folder's metrics.jsonl and the round/eval records:
    plots/online_eval.png (true CTR, match rate, RM win rate by round), plots/online_training.png
    (loss and reward margins by step), plots/renderer_pool.png (pool sizes over time)."""
    import json

    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    x = [e["after_rounds"] for e in evals]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    if evals and evals[0].get("true_ctr") is not None:
        axes[0].plot(x, [100 * e["true_ctr"] for e in evals], "o-", label="tuned PM")
        axes[0].plot(x, [100 * e["base_true_ctr"] for e in evals], "--", color="grey", label="pretrained PM")
        lo = [100 * (e["base_true_ctr"] + e["lift"]["ci95"][0]) for e in evals]
        hi = [100 * (e["base_true_ctr"] + e["lift"]["ci95"][1]) for e in evals]
        axes[0].fill_between(x, lo, hi, alpha=0.2, label="95% CI of the lift")
        nan = lambda v: np.nan if v is None else v  # noqa: E731 -- no ad set a scene: no match rate
        axes[1].plot(x, [nan(e["match_rate"]) for e in evals], "o-", label="tuned PM")
        axes[1].plot(x, [nan(e["base_match_rate"]) for e in evals], "--", color="grey", label="pretrained PM")
    axes[0].set_title("true CTR % on held-out products")
    axes[1].set_title("match rate (scene suits product)")
    axes[2].plot(x, [e["rm_win_rate"] for e in evals], "o-")
    axes[2].axhline(0.5, color="grey", lw=0.8)
    axes[2].set_title("RM win rate vs pretrained PM")
    written = [_finish(fig, axes, "rounds trained", plots / "online_eval.png")]

    log = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    steps = [m for m in records if m["kind"] == "train"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    s = [m["step"] for m in steps]
    for ax, keys in zip(axes, (("loss", "dpo/loss", "pcpo/loss"), ("rewards/margins", "pcpo/rewards/margins"))):
        for key in keys:
            if steps and key in steps[0]:
                ax.plot(s, [m[key] for m in steps], label=key)
    axes[0].set_title("loss by step")
    axes[1].set_title("reward margins by step")
    written.append(_finish(fig, axes, "train step", plots / "online_training.png"))

    fig, ax = plt.subplots(figsize=(6, 3))
    if pool_trace:
        t = [p[0] for p in pool_trace]
        ax.step(t, [p[1] for p in pool_trace], where="post", label="renderers")
        ax.step(t, [p[2] for p in pool_trace], where="post", label="RM scorers")
    ax.set_ylabel("alive actors")
    ax.set_title("actor pool sizes")
    written.append(_finish(fig, ax, "seconds since the pools started", plots / "renderer_pool.png"))
    return written


def _data_uri(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode()


def _with_ads(run_dir: Path, rows: list[dict]) -> list[dict]:
    """Rows whose ads the pipeline wrote to ``pairs/ads/<ads_part>`` get ``ad_a``/``ad_b`` from there
    (each part read once); rows that carry the bytes themselves are kept as they are."""
    import pyarrow.parquet as pq

    ads: dict[str, tuple] = {}
    for part in sorted({r["ads_part"] for r in rows if r.get("ads_part") and "ad_a" not in r}):
        for a in pq.read_table(run_dir / "pairs" / "ads" / part).to_pylist():
            ads[a["pair_id"]] = (a["ad_a"], a["ad_b"])
    return [r if "ad_a" in r else {**r, "ad_a": ads[r["pair_id"]][0], "ad_b": ads[r["pair_id"]][1]} for r in rows]


def write_run_report(run_dir: str | Path, per_round: int = 12) -> Path:
    """``report.html`` for an online run folder, self-contained (images inlined): the summary, the
    curves (plots/*.png) and, per round, up to ``per_round`` products with their chosen and
    rejected ads, descriptions, RM probability and (market runs) true CTR."""
    import html
    import json

    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>caig-ray run report</title><style>"
        "body{font-family:sans-serif;margin:1.2em;max-width:1400px}h2{border-bottom:1px solid #ccc}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 6px}"
        ".pair{display:inline-block;vertical-align:top;width:330px;margin:6px;font-size:11px;border:1px solid #eee;"
        "padding:4px}.pair img{width:150px;height:150px}.ch{outline:3px solid #2a2}.rj{outline:3px solid #c33}"
        ".plots img{max-width:100%}</style></head><body><h1>caig-ray online run</h1>",
        "<section id='summary'><h2>Summary</h2><table>",
    ]
    for k, v in summary.items():
        if k in ("renderer_pool_trace", "plots"):
            continue
        val = json.dumps(v) if not isinstance(v, float) else f"{v:.4g}"
        parts.append(f"<tr><th>{esc(k)}</th><td>{esc(val)}</td></tr>")
    parts.append("</table></section><section id='curves' class='plots'><h2>Training curves</h2>")
    for png in sorted((run_dir / "plots").glob("*.png")):
        parts.append(f"<figure><img alt='{esc(png.stem)}' src='{_data_uri(png.read_bytes())}'>"
                     f"<figcaption>{esc(png.name)}</figcaption></figure>")
    parts.append("</section><section id='rounds'><h2>Rounds: chosen (green) and rejected (red) ads</h2>")
    for f in sorted((run_dir / "pairs").glob("round_*.parquet")):
        rows = pq.read_table(f).to_pylist()
        shown = _with_ads(run_dir, [r for r in rows if r.get("chosen") in ("a", "b")][:per_round])
        parts.append(f"<h3 id='{f.stem}'>Round {int(f.stem.split('_')[1])}: {len(rows)} pairs, "
                     f"{sum(r['status'] == 'trained' for r in rows)} trained</h3>")
        for r in shown:
            c, j = r["chosen"], "b" if r["chosen"] == "a" else "a"
            p_a = r.get("p_left_debiased", r.get("p_left"))
            p_c = p_a if c == "a" else 1 - p_a
            cells = []
            for side, cls, label in ((c, "ch", "chosen"), (j, "rj", "rejected")):
                ctr = f" · true CTR {100 * r[f'true_ctr_{side}']:.2f}%" if f"true_ctr_{side}" in r else ""
                cells.append(f"<div style='display:inline-block;width:160px;vertical-align:top'>"
                             f"<img class='{cls}' alt='{label}' src='{_data_uri(r[f'ad_{side}'])}'><br>"
                             f"<b>{label}</b>{ctr}<br>{esc(r[f'desc_{side}'])}</div>")
            parts.append(f"<div class='pair'><b>{esc(r['title'])}</b> <small>{esc(r['product_id'])}</small><br>"
                         f"RM P(chosen better) {p_c:.3f}<br>{''.join(cells)}</div>")
    parts.append("</section></body></html>")
    path = run_dir / "report.html"
    path.write_text("".join(parts))
    return path
