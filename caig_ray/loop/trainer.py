"""A round's scored pairs become DPO+PCPO steps as they arrive; every planned pair's fate is recorded."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from caig_ray.config import CaigConfig
from caig_ray.loop.feed import Feed
from caig_ray.loop.protocols import Policy
from caig_ray.loop.runlog import RunLog
from caig_ray.online import MarketOracle, RunState
from caig_ray.pairs import account, preference_examples


def market_verdicts(oracle: MarketOracle | None, row: dict) -> dict:
    """The simulated market's verdict on both ads of a rendered pair (empty off the simulated market)."""
    if oracle is None or not row.get("latent_a"):
        return {}
    out = {}
    for side in ("a", "b"):
        v = oracle.verdict(row["category"], row[f"latent_{side}"], row[f"desc_{side}"], row["seed"], row["title"])
        out.update({f"true_ctr_{side}": v["true_ctr"], f"scene_{side}": v["scene"], f"match_{side}": v["match"],
                    f"has_scene_{side}": v["has_scene"]})
    return out


class RoundTrainer:
    """Train: a round's scored pairs become DPO+PCPO steps as they arrive (the RM picks chosen/rejected,
    ties and duplicates are skipped and counted); every planned pair's fate goes to
    ``pairs/round_XXX.parquet``."""

    def __init__(self, cfg: CaigConfig, out: Path, log: RunLog, oracle: MarketOracle | None):
        self.cfg, self.oc, self.out, self.log, self.oracle = cfg, cfg.online, out, log, oracle
        self.max_lag_steps = 0  # over the whole job: summary.json's policy_lag_steps_max

    def _step(self, group: Policy, state: RunState, examples: list[dict], r: int, trained: list[str], records: dict) -> None:
        t = time.perf_counter()
        metrics = group.train_step(examples)
        state.step += 1
        step = state.step
        lags = [step - 1 - records[e["pair_id"]]["policy_version"] for e in examples]
        for e in examples:
            records[e["pair_id"]].update(status="trained", trained_at_step=step)
            trained.append(e["pair_id"])
        metrics.update(round=r, step_s=time.perf_counter() - t, policy_lag_steps_max=max(lags),
                       since_round_start_s=time.perf_counter() - self.round_t0)
        self.round_train_s += metrics["step_s"]
        if self.round_first_step_s is None:
            self.round_first_step_s = t - self.round_t0
        self.log.write("train", step, metrics)
        self.max_lag_steps = max(self.max_lag_steps, max(lags))

    def train_round(self, r: int, group: Policy, feed: Feed, state: RunState, round_t0: float) -> dict:
        oc, n_workers = self.oc, self.cfg.resources.policy.num_workers
        planned = [c["pair_id"] for c in state.pending[str(r)]]
        B = max(oc.train_batch_size, n_workers)
        buf, trained, skipped, records = [], [], [], {}
        rendered = scored = 0
        render_s = 0.0
        self.round_t0, self.round_train_s, self.round_first_step_s = round_t0, 0.0, None
        step = lambda batch: self._step(group, state, batch, r, trained, records)  # noqa: E731
        for rows in feed.take("train", r, len(planned)):
            rendered += sum(1 for x in rows if x.get("ads_part"))
            render_s += sum(x.get("render_s") or 0.0 for x in rows)
            p_key = "p_left_debiased" if oc.debias_rm else "p_left"
            scored += sum(1 for x in rows if x.get(p_key) is not None)
            examples, skips = preference_examples(rows, [float(x[p_key]) for x in rows], oc.tie_margin)
            for x in rows:
                records[x["pair_id"]] = {
                    k: x.get(k) for k in ("pair_id", "round", "product_id", "title", "category", "seed", "desc_a",
                                          "desc_b", "policy_version", "p_left", p_key)} | {
                    # sampled token ids (Ray Data hands them back as arrays): plain lists in the parquet
                    **{f"ids_{s}": None if x.get(f"ids_{s}") is None else [int(t) for t in x[f"ids_{s}"]]
                       for s in ("a", "b")},
                    "ads_part": x["ads_part"], "status": "pending", "trained_at_step": -1,
                    **market_verdicts(self.oracle, x)}
            for e in examples:
                records[e["pair_id"]]["chosen"] = "a" if e["chosen"] == records[e["pair_id"]]["desc_a"] else "b"
            for s in skips:
                records[s["pair_id"]].update(status=f"skipped:{s['reason']}", chosen="")
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
                records[e["pair_id"]].update(status="skipped:fewer_examples_than_ranks")
                skipped.append(e["pair_id"])
        reasons: dict[str, int] = {}
        for rec in records.values():
            if rec["status"].startswith("skipped:"):
                reasons[rec["status"][8:]] = reasons.get(rec["status"][8:], 0) + 1
        acc = account(planned, trained, skipped)
        acc.update(pairs_rendered=rendered, pairs_scored=scored, skipped_reasons=reasons)
        rows = list(records.values())
        pq.write_table(pa.Table.from_pylist(rows), self.out / "pairs" / f"round_{r:03d}.parquet")
        info = {"round": r, **acc, "train_s": self.round_train_s, "render_busy_s": render_s,
                "first_step_after_s": self.round_first_step_s, "gen_s": feed.gen_s.get(r), "steps": state.step}
        if rows and "true_ctr_a" in rows[0]:
            chosen = [x for x in rows if x.get("chosen") in ("a", "b")]
            info["chosen_true_ctr_wins"] = float(np.mean([
                (x["true_ctr_a"] > x["true_ctr_b"]) == (x["chosen"] == "a") for x in chosen])) if chosen else None
        return info
