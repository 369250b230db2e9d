"""The run's metrics: metrics.jsonl and TensorBoard, one call per record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class RunLog:
    """metrics.jsonl + TensorBoard scalars, one call per record. What is logged:

    kind "train" (one per step): the loss terms of ``caig_ray.losses.dpo_pcpo_loss`` (TRL's names and
    formulas), and
    - ``policy_lag_steps_max``: max over the step's pairs of (steps taken before this one - steps taken
      when the pair was sampled)
    - ``lr``: the learning rate this step used (policy.lr_schedule: cosine = warmup then cosine decay)
    - ``n_micro_batches``: forwards per rank in the step = ceil(largest shard / policy.micro_batch_size)
    - ``step_s``: wall seconds of PolicyGroup.train_step; ``since_round_start_s``: when the step ended
    kind "round": ``pairs_*`` counts (``caig_ray.pairs.account``: lost = planned and neither trained
    nor skipped; duplicated = ids seen more than once downstream or never planned), and
    - ``chosen_true_ctr_wins``: mean over trained pairs of [true CTR(chosen) > true CTR(rejected)]
    - ``render_busy_s``: sum of the renderer's seconds on this round's blocks
    - ``first_step_after_s``: seconds from the round's start to its first train step
    - ``wait_s``: seconds of the round the driver spent blocked waiting for scored blocks
    kind "eval" (held-out products, ``online.eval_samples`` descriptions each, fixed seeds): the RM's
    metric over each product's first sample, the market's over all (``caig_ray.online.eval_market_metrics``):
    - ``rm_win_rate``: mean P_RM(tuned PM's ad beats the pretrained PM's ad), position-debiased
    - ``true_ctr`` / ``base_true_ctr``: mean market true CTR of the tuned / pretrained PM's ads
    - ``lift``: mean over products of the paired difference (mean over the product's samples of
      true_ctr - base_true_ctr), 95% CI mean ± 1.96·sd/√n, n = products
    - ``match_rate``: of the ads that set a scene, the share whose scene suits the product
    - ``mismatch_share`` / ``base_mismatch_share``: of *all* ads, the share whose scene does not suit
      the product (a plain background is no mismatch); ``mismatch_share_by_category``: the same per category
    - ``scene_rate``: share of ads whose description sets a scene
    kind "train" also carries, with PCPO on, ``pcpo/<kind>/loss`` and ``pcpo/<kind>/accuracy`` per
    negative kind (``caig_ray.losses.pcpo_kind_means``)
    kind "recovery" (one per in-job recovery): ``lost`` = "policy" (a PolicyWorker died) or "feed" (the
    PairFeed actor died), ``from_round`` = the round the loop restarts at (the last checkpoint's next round);
    records of the lost attempt's later rounds stay in this file, summary.json counts each round once
    kind "pool" (one per 0.25 s sample): ``renderers`` / ``scorers`` = alive actors of each Ray Data
    pool, ``t_s`` = seconds since the pools started
    """

    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.file = open(out / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, kind: str, step: int, values: dict) -> None:
        self.file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.file.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()
