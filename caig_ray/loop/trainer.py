"""A round's scored pairs become DPO+PCPO steps as they arrive; every planned pair's fate is recorded."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from caig_ray.config import CaigConfig
from caig_ray.loop.feed import Feed
from caig_ray.loop.protocols import Policy
from caig_ray.loop.runlog import RunLog
from caig_ray.online import MarketOracle, RunState
from caig_ray.pairs import account, preference_examples
from caig_ray.rows import VERDICT_FIELDS, PairRecord, PreferenceExample, ScoredPair


def market_verdicts(oracle: MarketOracle | None, row: ScoredPair) -> dict:
    """The simulated market's verdict on both ads of a rendered pair (``caig_ray.rows.VERDICT_FIELDS``
    per side; empty off the simulated market)."""
    if oracle is None:
        return {}
    out = {}
    for side, latent, desc in (("a", row.latent_a, row.desc_a), ("b", row.latent_b, row.desc_b)):
        v = oracle.verdict(row.category, latent, desc, row.seed, row.title)
        out.update({f"{name}_{side}": v[name] for name, _ in VERDICT_FIELDS})
    return out


class RoundTrainer:
    """Train: a round's scored pairs become DPO+PCPO steps as they arrive (the RM picks chosen/rejected,
    ties and duplicates are skipped and counted); every planned pair's fate goes to
    ``pairs/round_XXX.parquet``."""

    def __init__(self, cfg: CaigConfig, out: Path, log: RunLog, oracle: MarketOracle | None):
        self.cfg, self.oc, self.out, self.log, self.oracle = cfg, cfg.online, out, log, oracle
        self.max_lag_steps = 0  # over the whole job: summary.json's policy_lag_steps_max

    def _step(self, group: Policy, state: RunState, examples: list[PreferenceExample], r: int, trained: list[str],
              records: dict[str, PairRecord]) -> None:
        t = time.perf_counter()
        metrics = group.train_step(examples)
        state.step += 1
        step = state.step
        lags = [step - 1 - records[e.pair_id].policy_version for e in examples]
        for e in examples:
            records[e.pair_id].status, records[e.pair_id].trained_at_step = "trained", step
            trained.append(e.pair_id)
        metrics.update(round=r, step_s=time.perf_counter() - t, policy_lag_steps_max=max(lags),
                       since_round_start_s=time.perf_counter() - self.round_t0)
        self.round_train_s += metrics["step_s"]
        if self.round_first_step_s is None:
            self.round_first_step_s = t - self.round_t0
        self.log.write("train", step, metrics)
        self.max_lag_steps = max(self.max_lag_steps, max(lags))

    def train_round(self, r: int, group: Policy, feed: Feed, state: RunState, round_t0: float) -> dict:
        oc, n_workers = self.oc, self.cfg.resources.policy.num_workers
        planned = [c.pair_id for c in state.pending[str(r)]]
        B = max(oc.train_batch_size, n_workers)
        buf, trained, skipped, records = [], [], [], {}
        rendered = scored = 0
        render_s = 0.0
        self.round_t0, self.round_train_s, self.round_first_step_s = round_t0, 0.0, None
        step = lambda batch: self._step(group, state, batch, r, trained, records)  # noqa: E731
        for rows in feed.take("train", r, len(planned)):
            rendered += sum(1 for x in rows if x.ads_part)
            render_s += sum(x.render_s for x in rows)
            p_first = [x.p_first(oc.debias_rm) for x in rows]
            scored += sum(1 for p in p_first if not math.isnan(p))
            examples, skips = preference_examples(rows, p_first, oc.tie_margin)
            for x in rows:
                records[x.pair_id] = PairRecord.of(x, market_verdicts(self.oracle, x))
            for e in examples:
                records[e.pair_id].chosen = "a" if e.chosen == records[e.pair_id].desc_a else "b"
            for s in skips:
                records[s["pair_id"]].status, records[s["pair_id"]].chosen = f"skipped:{s['reason']}", ""
                skipped.append(s["pair_id"])
            buf += examples
            while len(buf) >= B + n_workers:  # keep enough back that the round's last step has one per rank
                step(buf[:B])
                buf = buf[B:]
        while len(buf) >= 2 * B:
            step(buf[:B])
            buf = buf[B:]
        if len(buf) >= n_workers:
            step(buf)
        else:
            for e in buf:  # fewer examples than ranks: no step can take them; say so, never drop silently
                records[e.pair_id].status = "skipped:fewer_examples_than_ranks"
                skipped.append(e.pair_id)
        reasons: dict[str, int] = {}
        for rec in records.values():
            if rec.status.startswith("skipped:"):
                reasons[rec.status[8:]] = reasons.get(rec.status[8:], 0) + 1
        acc = account(planned, trained, skipped)
        acc.update(pairs_rendered=rendered, pairs_scored=scored, skipped_reasons=reasons)
        rows = list(records.values())
        pq.write_table(PairRecord.table(rows), self.out / "pairs" / f"round_{r:03d}.parquet")
        info = {"round": r, **acc, "train_s": self.round_train_s, "render_busy_s": render_s,
                "first_step_after_s": self.round_first_step_s, "gen_s": feed.gen_s.get(r), "steps": state.step}
        if rows and self.oracle is not None:
            chosen = [x for x in rows if x.chosen in ("a", "b")]
            info["chosen_true_ctr_wins"] = float(np.mean([
                (x.true_ctr_a > x.true_ctr_b) == (x.chosen == "a") for x in chosen])) if chosen else None
        return info
