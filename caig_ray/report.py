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
