"""Held-out evaluation: the tuned policy's ads beside the pretrained PM's, judged by the RM and the market."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from caig_ray.config import CaigConfig
from caig_ray.loop.feed import Feed, policy_input
from caig_ray.loop.plan import RoundPlan
from caig_ray.loop.protocols import Policy
from caig_ray.loop.trainer import market_verdicts
from caig_ray.online import MarketOracle, RunState, eval_market_metrics, render_seed
from caig_ray.prompts import clean_prompt
from caig_ray.rows import CandidatePair, eval_table

EVAL_SEED_ROUND = 10**6  # render seeds of evaluation ads: one fixed seed per product for every evaluation


class Evaluator:
    """Evaluate: ``online.eval_samples`` descriptions per held-out product (fixed sampling seed), each
    ad rendered beside the pretrained PM's sample of the same index (same render seed); the market
    judges every ad, the RM the first sample's pair."""

    def __init__(self, cfg: CaigConfig, out: Path, oracle: MarketOracle | None):
        self.cfg, self.oc, self.out, self.oracle = cfg, cfg.online, out, oracle

    def sample(self, after_rounds: int, plan: RoundPlan, group: Policy, feed: Feed, state: RunState) -> None:
        prods, k = plan.eval_products(), self.oc.eval_samples
        gens = group.generate([policy_input(p) for p in prods], n=k,
                              temperature=self.cfg.policy.temperature, seed=self.oc.seed * 7919 + 99991)
        mine = [g["descriptions"][:k] for g in gens]
        if state.eval_base is None:  # the pretrained PM's descriptions, kept for every evaluation
            state.eval_base = mine
        rows = [CandidatePair(pair_id=f"eval-e{after_rounds:03d}-{p.id}-s{j}", kind="eval", round=after_rounds,
                              product_id=p.id, title=p.title, category=p.category or "", instruction="",
                              desc_a=clean_prompt(a), desc_b=clean_prompt(b), sample=j, rm_score=j == 0,
                              seed=render_seed(self.oc.seed, p.id, EVAL_SEED_ROUND + j), policy_version=state.step)
                for p, a_s, b_s in zip(prods, mine, state.eval_base) for j, (a, b) in enumerate(zip(a_s, b_s))]
        feed.put(rows, plan.products)

    def collect(self, after_rounds: int, plan: RoundPlan, feed: Feed, state: RunState) -> dict:
        n = len(plan.eval_ids) * self.oc.eval_samples
        rows = [x for block in feed.take("eval", after_rounds, n) for x in block]
        ev = {"after_rounds": after_rounds, "step": state.step,
              "rm_win_rate": float(np.mean([x.p_first(self.oc.debias_rm) for x in rows if x.rm_score]))}
        verdicts = [market_verdicts(self.oracle, x) for x in rows]
        if self.oracle is not None:
            ev.update(eval_market_metrics(rows, verdicts))
        pq.write_table(eval_table(rows, verdicts), self.out / "pairs" / f"eval_{after_rounds:03d}.parquet")
        return ev
