"""Preference pairs: same-product creative pairs from click logs (the RM's training data)."""

from __future__ import annotations

import zlib
from collections import defaultdict

import numpy as np

from caig_ray.rows import PreferenceExample, ScoredPair


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


def split_products(product_ids, test_fraction: float, seed: int) -> tuple[set, set]:
    """Split distinct products into (train, test) sets with a seeded shuffle: no product in both."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    products = sorted(set(product_ids))
    order = np.random.default_rng([seed, 31]).permutation(len(products))
    n_test = int(round(test_fraction * len(products)))
    test = {products[i] for i in order[:n_test]}
    return set(products) - test, test


def mine_rm_pairs(
    logs, min_impressions: int = 1000, band: tuple[float, float] = (1.05, 1.20),
    test_fraction: float = 0.2, seed: int = 0,
) -> list[dict]:
    """RM training/evaluation pairs from a click-log table (``read_click_logs`` output).

    Each pair: ``product_id``, ``left_row``/``right_row`` (row indices into ``logs``), their
    creative ids and logged CTRs, ``label`` (0 = left has the higher logged CTR, 1 = right), and
    ``split`` ("train"/"test", by product). Left/right order comes from a seeded shuffle that gives
    exactly balanced labels within each split (up to one pair when the count is odd)."""
    cols = {c: logs.column(c).to_pylist() for c in ("product_id", "creative_id", "impressions", "clicks")}
    hi_lo = band_pairs(cols["product_id"], cols["impressions"], cols["clicks"], min_impressions, band)
    _, test = split_products(cols["product_id"], test_fraction, seed)
    rng = np.random.default_rng([seed, 37])
    out = []
    for split in ("train", "test"):
        mine = [p for p in hi_lo if (cols["product_id"][p[0]] in test) == (split == "test")]
        flips = np.zeros(len(mine), dtype=bool)
        flips[: len(mine) // 2] = True
        rng.shuffle(flips)
        for (hi, lo), flip in zip(mine, flips):
            left, right = (lo, hi) if flip else (hi, lo)
            ctr = lambda r: cols["clicks"][r] / cols["impressions"][r]  # noqa: E731
            out.append({
                "product_id": cols["product_id"][hi], "split": split,
                "left_row": left, "right_row": right,
                "left_creative": cols["creative_id"][left], "right_creative": cols["creative_id"][right],
                "ctr_left": ctr(left), "ctr_right": ctr(right), "label": int(flip),
            })
    return out


def redraw_pair(p: dict, seed: int, epoch: int) -> dict:
    """One RM pair for one epoch with left/right drawn again (CAIG draws the order per example, not once
    per pair): swapped with probability 1/2, a function of (seed, epoch, the pair's mined rows) -- the
    same wherever and in whatever order a trainer's shard meets it. A swap exchanges rows, images,
    creatives and CTRs and flips ``label``. Epoch 0 keeps the mined order."""
    if epoch == 0 or zlib.crc32(f"{seed}|{epoch}|{min(p['left_row'], p['right_row'])}|"
                                f"{max(p['left_row'], p['right_row'])}".encode()) % 2 == 0:
        return p
    swapped = {**p, "label": 1 - p["label"]}
    for a, b in (("left_row", "right_row"), ("left_creative", "right_creative"), ("ctr_left", "ctr_right"),
                 ("left_image", "right_image")):
        if a in p:
            swapped[a], swapped[b] = p[b], p[a]
    return swapped


def preference_examples(candidates: list[ScoredPair], p_first: list[float], tie_margin: float | None = 0.0
                        ) -> tuple[list[PreferenceExample], list[dict]]:
    """The online loop's DPO examples from scored candidate pairs (CAIG: the RM picks chosen/rejected).

    The sampled token ids ``ids_a``/``ids_b`` go to the example as ``chosen_ids``/``rejected_ids``;
    ``same_ad``: the pipeline found both ads identical; ``p_first[i]`` is the RM's P(ad of ``desc_a``
    gets more clicks). Returns (examples, skipped: ``pair_id`` and ``reason``). Skipped, with the
    reason: "duplicate" (identical descriptions: the renderer paints the same ad twice) and "tie"
    (both ads identical pixel for pixel, or |p - 0.5| <= ``tie_margin``: the RM prefers neither, and
    ``p >= 0.5`` would hand the win to the first sample). ``tie_margin`` None is CAIG's scripts' rule:
    no tie is skipped and ``p >= 0.5`` picks ``desc_a``. Every other pair becomes one example."""
    if len(candidates) != len(p_first):
        raise ValueError(f"{len(candidates)} candidate pairs but {len(p_first)} scores")
    examples, skipped = [], []
    for cand, p in zip(candidates, p_first):
        if cand.desc_a.strip() == cand.desc_b.strip():
            skipped.append({"pair_id": cand.pair_id, "reason": "duplicate"})
            continue
        if tie_margin is not None and (cand.same_ad or abs(p - 0.5) <= tie_margin):
            skipped.append({"pair_id": cand.pair_id, "reason": "tie"})
            continue
        a_wins = p >= 0.5  # CAIG's decision rule: logit[0] >= logit[1] -> left (ties were skipped above)
        (chosen, chosen_ids), (rejected, rejected_ids) = ((cand.desc_a, cand.ids_a), (cand.desc_b, cand.ids_b))[
            :: 1 if a_wins else -1]
        examples.append(PreferenceExample(
            pair_id=cand.pair_id, image_ref=cand.image_ref, instruction=cand.instruction, chosen=chosen,
            rejected=rejected, chosen_ids=chosen_ids, rejected_ids=rejected_ids, seed=cand.seed,
            p_chosen=p if a_wins else 1 - p))
    return examples, skipped


def account(planned: list[str], trained: list[str], skipped: list[str]) -> dict:
    """Where every planned pair went: ``pairs_lost`` (planned, neither trained on nor skipped) and
    ``pairs_duplicated`` (ids seen more than once downstream, or downstream but never planned)."""
    seen: dict[str, int] = {}
    for pid in list(trained) + list(skipped):
        seen[pid] = seen.get(pid, 0) + 1
    planned_set = set(planned)
    return {
        "pairs_planned": len(planned), "pairs_trained": len(trained), "pairs_skipped": len(skipped),
        "pairs_lost": sum(1 for pid in planned_set if pid not in seen),
        "pairs_duplicated": sum(n - 1 for n in seen.values()) + sum(1 for pid in seen if pid not in planned_set),
    }
