"""``RewardScorer`` and ``CandidateRanker``: the frozen RM, batched and in eval mode, for Ray.

``RewardScorer`` is the online loop's Ray Data ``map_batches`` callable class (columns ``left_image``,
``right_image`` as encoded image bytes, ``title``, ``rm_score``; adds ``p_left``, ``p_left_debiased``,
``ctr_left``, ``ctr_right``; with ``ads``, the online loop's storage, the ads are written there and
replaced by ``ads_part``); ``CandidateRanker`` is ``generate``'s, on ``ProductCandidates`` rows (the N
candidates ranked inside the row). One class per row type: neither decides by what a block holds.
``__init__`` loads from the path, so a restarted pool actor is the same scorer.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
from PIL import Image

from caig_ray.config import FaultConfig
from caig_ray.faults import BatchFault
from caig_ray.rows import ProductCandidates
from caig_ray.scoring import PairScorer, PairToScore, rank_round_robin, round_robin
from caig_ray.storage import Output, part_name, write_part


def _image(value) -> Image.Image:
    return value if isinstance(value, Image.Image) else Image.open(io.BytesIO(bytes(value))).convert("RGB")


def write_ads(batch: dict[str, np.ndarray], ads: Output) -> dict[str, np.ndarray]:
    """A scored block's ads written to the run's storage as one parquet part (``pair_id``, ``ad_a``,
    ``ad_b``) named by a hash of its pair ids (a retried batch rewrites the same part); the block goes
    on with ``ads_part`` (the part's file name, under ``pairs/ads/``) and ``same_ad`` (both ads
    identical: a tie) instead of the image bytes -- the online loop's driver never receives an image."""
    fs, folder = ads.filesystem()
    ids = [str(i) for i in batch["pair_id"]]
    left, right = [bytes(x) for x in batch.pop("left_image")], [bytes(x) for x in batch.pop("right_image")]
    name = part_name(ids)
    write_part(pa.table({"pair_id": ids, "ad_a": left, "ad_b": right}), folder, name, filesystem=fs)
    batch["ads_part"] = np.array([name] * len(ids), dtype=object)
    batch["same_ad"] = np.array([a == b for a, b in zip(left, right)])
    return batch


SCORE_KEYS = ("p_left", "p_left_debiased", "ctr_left", "ctr_right")


class RewardScorer:
    def __init__(self, model_path: str, pair_image_size: int | None = None, batch_size: int = 16,
                 device: str = "cpu", dtype: str = "float32", debias: bool = True, fault: FaultConfig | None = None,
                 ads: Output | None = None):
        # imported here, in the actor: the driver that builds the pool imports this module for the class
        # alone and needs no transformers (~4 s of CPU)
        from caig_ray.models.reward import load_reward_model

        model, processor = load_reward_model(model_path, dtype=dtype, device=device)
        self.scorer = PairScorer(model, processor, pair_image_size, batch_size, device)
        self.debias, self.ads = debias, ads
        self.fault = BatchFault.of(fault, "scorer", "scorer_die_after_batches")

    def score(self, pairs: list[PairToScore]) -> dict[str, list[float]]:
        return self.scorer.score(pairs, debias=self.debias)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The online loop's block of rendered ``CandidatePair`` columns: each pair scored once."""
        n = len(batch["title"])
        # the online loop's evaluation marks the ads only the market judges (rm_score False): not scored
        wanted = np.flatnonzero(batch["rm_score"])
        pairs = [PairToScore(_image(batch["left_image"][i]), _image(batch["right_image"][i]), str(batch["title"][i]))
                 for i in wanted]
        scores = self.score(pairs) if pairs else {}
        for key in SCORE_KEYS:  # every column on every block (p_left_debiased NaN with debias off)
            column = np.full(n, np.nan, dtype=np.float32)
            if key in scores:
                column[wanted] = scores[key]
            batch[key] = column
        self.fault.tick()
        return write_ads(batch, self.ads) if self.ads is not None else batch


class CandidateRanker(RewardScorer):
    """``generate``'s scorer stage: a block of ``ProductCandidates`` with ``ads`` -> the same rows with
    the N candidates ranked inside each (every pair scored, both orders): ``win_rate``, ``ctr``,
    ``rank`` (0 = best) per candidate; the ranking code is Serve's /v1/rank's."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = ProductCandidates.from_table(batch)
        pairs, starts = [], []
        for r in rows:
            images = [_image(a) for a in r.ads]
            attributes = json.loads(r.attributes or "{}")
            starts.append(len(pairs))
            pairs += [PairToScore(images[i], images[j], r.title, attributes) for i, j in round_robin(len(images))]
        res = self.scorer.score(pairs, debias=True) if pairs else {}
        out = []
        for r, start in zip(rows, starts):
            k = len(round_robin(len(r.ads)))
            win_rate, ctr, order = rank_round_robin(len(r.ads), *(res.get(key, [])[start:start + k] for key in
                                                                   ("p_left_debiased", "ctr_left", "ctr_right")))
            out.append(dataclasses.replace(r, win_rate=list(win_rate), ctr=list(ctr),
                                           rank=[order.index(c) for c in range(len(order))]))
        self.fault.tick()
        return ProductCandidates.table(out)
