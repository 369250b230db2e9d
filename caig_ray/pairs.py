"""Preference pairs: same-product creative pairs from click logs (the RM's training data)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def band_pairs(
    product_ids, impressions, clicks, min_impressions: int = 1000, band: tuple[float, float] = (1.05, 1.20)
) -> list[tuple[int, int]]:
    """Row-index pairs (hi, lo) of creatives of the same product, each with impressions
    > ``min_impressions``, whose logged CTR ratio CTR_hi / CTR_lo lies in ``band`` (CAIG's rule).
    Pairs with a zero CTR on the low side have no finite ratio and are not in any band."""
    imp = np.asarray(impressions, dtype=np.float64)
    clk = np.asarray(clicks, dtype=np.float64)
    ctr = np.divide(clk, imp, out=np.zeros_like(clk), where=imp > 0)
    by_product: dict[str, list[int]] = defaultdict(list)
    for row, pid in enumerate(product_ids):
        if imp[row] > min_impressions:
            by_product[pid].append(row)
    pairs = []
    for rows in by_product.values():
        for a_i, a in enumerate(rows):
            for b in rows[a_i + 1:]:
                hi, lo = (a, b) if ctr[a] >= ctr[b] else (b, a)
                if ctr[lo] > 0 and band[0] <= ctr[hi] / ctr[lo] <= band[1]:
                    pairs.append((hi, lo))
    return pairs
