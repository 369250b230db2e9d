"""The online CTR-driven loop: ``python -m caig_ray.jobs.caig`` / ``caig-ray train``.

Per round (CAIG): the policy samples N=2 descriptions per product (T=1.0); both are rendered with
the same seed by a Ray Data renderer pool; the frozen RM (a scorer pool) picks chosen/rejected;
duplicates are skipped and counted; DPO+PCPO steps train the policy (DeepSpeed ZeRO in a
``PolicyGroup``) as soon as scored blocks arrive; the reference stays the ``--policy`` the run started
from (the pretrained PM, or an earlier run's policy a weekly run continues from). The pools
live for the whole job (``actors/stream.py``). ``online.max_policy_lag`` rounds may be sampled
ahead of training (0 = CAIG's strict rounds).

Every ``online.eval_every`` rounds (and before the first) the policy writes one description per
held-out product with a fixed sampling seed; its ad is rendered beside the pretrained PM's (same
render seed) and scored by the RM (win rate); on the simulated market the oracle gives true CTR
and match. Checkpoints (policy, optimizer, round, data position, pending samples) every
``online.checkpoint_every`` rounds; a run folder holds one run (``run.json``: id, status, rounds done):
a fresh run refuses a used folder, ``--resume`` continues the folder's run from its last checkpoint and
refuses a finished one (docs/operations.md).

The driver is the control plane: the catalog is validated on the cluster (``catalog/valid`` and
``catalog/rejects`` parts, actors/catalog.py) and the driver keeps ids, titles and an image reference
per product; product images are opened by the renderers and the policy ranks from that reference.

Run folder: run.json, config.yaml, metrics.jsonl, summary.json, checkpoints/, tensorboard/, catalog/, pairs/
(round_XXX.parquet, eval_XXX.parquet: one row per pair, its ads in the ads/ part it names),
plots/, report.html.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from caig_ray.config import CaigConfig, ConfigError, load_config, save_config
from caig_ray.faults import should_fire
from caig_ray.online import (
    MarketOracle, RunRecord, RunState, candidate_pairs, eval_market_metrics, pm_template,
    render_seed, round_products,
    split_eval_products,
)
from caig_ray.pairs import account, preference_examples
from caig_ray.prompts import clean_prompt
from caig_ray.storage import (Output, OutputInUse, atomic_write_text, is_used, new_run_id, refuse_used,
                              resolve_output)
from caig_ray.jobs._entry import model_arg, pick, add_config_args, run_job
from caig_ray.jobs._ray import init_ray

logger = logging.getLogger(__name__)
EVAL_SEED_ROUND = 10**6  # render seeds of evaluation ads: one fixed seed per product for every evaluation


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


def _check_same_run(saved: CaigConfig, now: CaigConfig, where: Path) -> None:
    """--resume must continue the same run: only online.rounds, online.faults and storage (a run copied
    to another store) may change."""
    a, b = saved.model_dump(mode="json"), now.model_dump(mode="json")
    for d in (a, b):
        d["online"].pop("rounds"), d["online"].pop("faults"), d.pop("storage")
    if a != b:
        diff = sorted(
            f"{sec}.{k}" if isinstance(a[sec], dict) else sec
            for sec in a for k in (a[sec] if isinstance(a[sec], dict) else [sec])
            if (a[sec].get(k) != b[sec].get(k) if isinstance(a[sec], dict) else a[sec] != b[sec]))
        raise ConfigError(f"--resume with a config that differs from the run's {where}: {', '.join(diff) or 'name'}; "
                          "only online.rounds, online.faults and storage may change")


def _run_checkpoints(store: Output, run_id: str) -> list[str]:
    """Names of the run's complete checkpoints in storage, oldest first: ``round_XXX`` holding a
    ``state.json`` of this run (``RunState.run_id``) -- another run's files are never counted."""
    ckpts, done = store.child("checkpoints"), []
    for n in ckpts.listdir():
        state = ckpts.child(f"{n}/state.json")
        if n.startswith("round_") and state.exists() and state.download():
            if RunState.from_json(state.local.read_text()).run_id == run_id:
                done.append(n)
    return sorted(done, key=lambda n: int(n.removeprefix("round_")))  # by round: round_1000 after round_999


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _blocks(n_rows: int, size: int) -> int:
    return -(-n_rows // size)


class RoundPlan:
    """Plan: which products each round samples (``caig_ray.online.round_products``), which are held out,
    which rounds are evaluated, and how many blocks the pipeline will carry."""

    def __init__(self, oc, products: dict):
        self.oc, self.products = oc, products
        self.train_ids, self.eval_ids = split_eval_products(list(products), oc.eval_products, oc.seed)

    def eval_after(self, r: int) -> bool:
        return (r + 1) % self.oc.eval_every == 0 or r == self.oc.rounds - 1

    def round_products(self, r: int) -> list:
        return [self.products[i] for i in round_products(self.train_ids, r, self.oc.products_per_round, self.oc.seed)]

    def eval_products(self) -> list:
        return [self.products[i] for i in self.eval_ids]

    def n_blocks(self, state: RunState) -> int:
        """Blocks still to come from ``state`` on: every round's and every evaluation's."""
        oc, start = self.oc, state.next_round
        per_round = _blocks(min(oc.products_per_round, len(self.train_ids)), oc.pairs_per_batch)
        per_eval = _blocks(len(self.eval_ids) * oc.eval_samples, oc.pairs_per_batch)
        evals = sum(self.eval_after(r) for r in range(start, oc.rounds)) + (state.eval_base is None)
        return per_round * (oc.rounds - start) + per_eval * evals


class Feed:
    """Feed and stream: samples with the policy group a block at a time and puts each block into the
    pipeline as soon as it is sampled (renderers start on a round's first block while the policy
    samples the next, docs/online-loop.md, the driver is the control plane); takes scored blocks back by segment (kind, round). One per
    pipeline: a recovery builds a new one."""

    def __init__(self, cfg: CaigConfig, group, stream):
        self.cfg, self.oc, self.group, self.stream = cfg, cfg.online, group, stream
        self.fed_rounds: set[int] = set()
        self.buffer: dict[tuple, list[dict]] = {}
        self.gen_s: dict[int, float] = {}  # round -> seconds its sampling took

    def put(self, rows: list[dict], products: dict) -> None:
        """Rows in blocks of ``pairs_per_batch``, each saying where its product image is (never the image)."""
        for k in range(0, len(rows), self.oc.pairs_per_batch):
            chunk = rows[k:k + self.oc.pairs_per_batch]
            self.stream.put([{**r, "image_ref": products[r["product_id"]].image_ref} for r in chunk])

    def sample_round(self, r: int, plan: RoundPlan, state: RunState) -> None:
        """Sample round ``r`` with the current weights (or take the samples a checkpoint kept) and feed it."""
        key = str(r)
        if key in state.pending:  # sampled before a checkpoint: fed as kept
            self.put(state.pending[key], plan.products)
        else:
            prods = plan.round_products(r)
            k = self.cfg.policy.instruction_templates  # each product's instruction for this round (CAIG's variety)
            block, pairs, t = self.oc.pairs_per_batch, [], time.perf_counter()
            for c in range(0, len(prods), block):
                inputs = [{**policy_input(p), "template": pm_template(self.oc.seed, p.id, r, k)}
                          for p in prods[c:c + block]]
                gens = self.group.generate(inputs, n=self.oc.samples_per_product, temperature=self.cfg.policy.temperature,
                                           seed=self.oc.seed * 7919 + r + 104729 * (c // block))
                rows = candidate_pairs(prods[c:c + block], gens, r, self.oc.seed, state.step, n_templates=k)
                self.put(rows, plan.products)
                pairs += rows
            self.gen_s[r] = time.perf_counter() - t
            state.pending[key] = pairs
        self.fed_rounds.add(r)

    def take(self, kind: str, index: int, n_rows: int):
        """Yield the rows of segment (kind, index) as they arrive; rows of other segments are kept."""
        key, got = (kind, index), 0
        while got < n_rows:
            if self.buffer.get(key):
                rows = self.buffer.pop(key)
            else:
                block = self.stream.next_block()
                seg = (block[0]["kind"], int(block[0]["round"]))
                if seg != key:
                    self.buffer.setdefault(seg, []).extend(block)
                    continue
                rows = block
            got += len(rows)
            yield rows


def policy_input(p) -> dict:
    """What a policy rank needs of a product to describe it: text, and where the image is."""
    return {"image_ref": p.image_ref, "title": p.title, "attributes": p.attributes}


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

    def _step(self, group, state: RunState, examples: list[dict], r: int, trained: list[str], records: dict) -> None:
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

    def train_round(self, r: int, group, feed: Feed, state: RunState, round_t0: float) -> dict:
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


class Evaluator:
    """Evaluate: ``online.eval_samples`` descriptions per held-out product (fixed sampling seed), each
    ad rendered beside the pretrained PM's sample of the same index (same render seed); the market
    judges every ad, the RM the first sample's pair."""

    def __init__(self, cfg: CaigConfig, out: Path, oracle: MarketOracle | None):
        self.cfg, self.oc, self.out, self.oracle = cfg, cfg.online, out, oracle

    def sample(self, after_rounds: int, plan: RoundPlan, group, feed: Feed, state: RunState) -> None:
        prods, k = plan.eval_products(), self.oc.eval_samples
        gens = group.generate([policy_input(p) for p in prods], n=k,
                              temperature=self.cfg.policy.temperature, seed=self.oc.seed * 7919 + 99991)
        mine = [g["descriptions"][:k] for g in gens]
        if state.eval_base is None:  # the pretrained PM's descriptions, kept for every evaluation
            state.eval_base = mine
        rows = []
        for p, a_s, b_s in zip(prods, mine, state.eval_base):
            for j, (a, b) in enumerate(zip(a_s, b_s)):
                rows.append({"pair_id": f"eval-e{after_rounds:03d}-{p.id}-s{j}", "kind": "eval",
                             "round": after_rounds, "product_id": p.id, "title": p.title, "category": p.category or "",
                             "instruction": "", "desc_a": clean_prompt(a), "desc_b": clean_prompt(b), "sample": j,
                             "rm_score": j == 0, "seed": render_seed(self.oc.seed, p.id, EVAL_SEED_ROUND + j),
                             "policy_version": state.step})
        feed.put(rows, plan.products)

    def collect(self, after_rounds: int, plan: RoundPlan, feed: Feed, state: RunState) -> dict:
        n = len(plan.eval_ids) * self.oc.eval_samples
        rows = [x for block in feed.take("eval", after_rounds, n) for x in block]
        p_key = "p_left_debiased" if self.oc.debias_rm else "p_left"
        ev = {"after_rounds": after_rounds, "step": state.step,
              "rm_win_rate": float(np.mean([x[p_key] for x in rows if x["sample"] == 0]))}
        verdicts = [market_verdicts(self.oracle, x) for x in rows]
        if verdicts and verdicts[0]:
            ev.update(eval_market_metrics(rows, verdicts))
        table = [{k: v for k, v in x.items() if k not in ("latent_a", "latent_b")} | verd
                 for x, verd in zip(rows, verdicts)]
        pq.write_table(pa.Table.from_pylist(table), self.out / "pairs" / f"eval_{after_rounds:03d}.parquet")
        return ev


class Checkpoints:
    """Checkpoints in storage: every rank's part of the weights and optimizer, then ``state.json``
    (a ``RunState``) written last -- a checkpoint without it is incomplete and ignored."""

    def __init__(self, store: Output, keep: int, run_id: str, resume: bool):
        self.store, self.keep, self.run_id = store, keep, run_id
        done = _run_checkpoints(store, run_id) if resume else []
        if resume and not done:
            print(f"--resume: no checkpoint of run {run_id} under {store.child('checkpoints')}; starting from round 0",
                  file=sys.stderr)
        self.latest = store.child(f"checkpoints/{done[-1]}") if done else None

    def restored_state(self) -> RunState:
        """The loop's state at the last checkpoint (a fresh one before the first)."""
        if self.latest is None:
            return RunState(run_id=self.run_id)
        return RunState.from_json((self.latest.local / "state.json").read_text())

    def load_into(self, group) -> None:
        if self.latest is not None:
            group.load(self.latest.local, self.latest.uri)

    def save(self, r: int, group, state: RunState) -> None:
        ckpt = self.store.child(f"checkpoints/round_{r:03d}")
        d = ckpt.local
        if d.exists():  # this run's own checkpoint of round r (a round re-run after a recovery): a folder holds one run
            shutil.rmtree(d)
        ckpt.delete()
        group.save(d, ckpt.uri)  # every rank's part; uploaded node by node with object-store storage
        # trained rounds leave the pending set; rounds sampled ahead (max_policy_lag) stay with their samples
        state.pending = {k: v for k, v in state.pending.items() if int(k) > r}
        self.store.upload(exclude=("checkpoints", "policy"))  # metrics, pairs, config: as far as this checkpoint
        tmp = d / "state.json.tmp"
        tmp.write_text(state.to_json())
        tmp.rename(d / "state.json")  # written last: a checkpoint without it is incomplete and ignored
        ckpt.child("state.json").upload()
        self.latest = ckpt
        ckpts = self.store.child("checkpoints")
        for old in _run_checkpoints(self.store, self.run_id)[:-self.keep]:  # this run's only
            shutil.rmtree(ckpts.local / old, ignore_errors=True)
            ckpts.child(old).delete()


class OnlineLoop:
    """The job: checks, then plan -> feed -> train -> evaluate -> checkpoint, round by round, with
    in-job recovery from a lost policy rank or feed. The parts above hold the work; this class holds
    the run's state (``RunState``) and the live policy group and pipeline."""

    def __init__(self, cfg: CaigConfig, out: Output, policy: str, rm: str, catalog: str, resume: bool,
                 progress: bool = True, image_root: str | None = None):
        self.cfg, self.oc, self.store, self.out, self.policy_path, self.rm_path = (
            cfg, cfg.online, out, out.local, policy, rm)
        self.catalog, self.image_root, self.progress = catalog, image_root, progress
        self.record = self._claim(resume)
        if out.staged:  # the object store is the run: the local staging copy (our cache, not an output) is rebuilt from it
            shutil.rmtree(self.out, ignore_errors=True)
            if resume:
                out.download(exclude=("checkpoints", "policy"))
        from caig_ray.models.renderer import check_sd_folders
        from caig_ray.models.vlm import check_model_folder

        check_model_folder(policy, "--policy (the pretrained PM)", kind="policy")
        check_model_folder(rm, "--rm (the trained reward model)", kind="reward")
        if cfg.renderer.kind == "diffusers":
            check_sd_folders(cfg.renderer)
        if resume and (self.out / "config.yaml").exists():
            # the run's own record of its whole config (base: none; a run folder from before bases: the same)
            _check_same_run(load_config(self.out / "config.yaml", preset="none"), cfg, self.store.child("config.yaml"))
        self.oracle = MarketOracle(cfg.market) if cfg.renderer.kind == "procedural" else None
        for sub in ("checkpoints", "pairs", "plots"):  # only now: a refused start leaves the folder as it was
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.checkpoints = Checkpoints(self.store, self.oc.keep_checkpoints, self.record.run_id, resume)
        self.state = self.checkpoints.restored_state()
        self._write_record()
        self.recoveries = {"policy": 0, "feed": 0}
        save_config(cfg, self.out / "config.yaml")

    def _claim(self, resume: bool) -> RunRecord:
        """The run this job is: a new one in an unused folder, or (``--resume``) the one the folder holds
        while it has rounds left to train. Nothing of another run is reused or replaced."""
        held = self.store.child("run.json")
        record = RunRecord.from_json(held.local.read_text()) if held.download() else None
        if not resume:
            if record is None:
                remedy = "give a new --out (an unused folder)"
            elif record.status == "finished":
                remedy = f"it holds {record.describe()}; pass a new --out"
            else:
                remedy = f"it holds {record.describe()}: pass --resume to continue it, or a new --out"
            refuse_used(self.store, remedy)
        elif record is None and is_used(self.store):
            raise OutputInUse(f"--resume: {self.store} holds no caig-ray run (no run.json): give the run's own folder, "
                              "or a new --out")
        elif record is not None:
            if record.status == "finished":
                raise OutputInUse(f"--resume: {record.describe()}; pass a new --out")
            if record.rounds_done >= self.oc.rounds:  # stopped after its last checkpoint, before its policy was saved
                print(f"--resume: finishing {record.describe()}: its policy is saved from the last checkpoint",
                      file=sys.stderr)
            else:
                print(f"--resume: continuing {record.describe()} to round {self.oc.rounds}", file=sys.stderr)
            record.rounds = self.oc.rounds
            return record
        else:
            print(f"--resume: {self.store} is empty: starting a new run", file=sys.stderr)
        return RunRecord(run_id=new_run_id(), started_at=_now(), rounds=self.oc.rounds)

    def _write_record(self, **changes) -> None:
        for k, v in changes.items():
            setattr(self.record, k, v)
        atomic_write_text(self.out / "run.json", self.record.to_json())
        self.store.child("run.json").upload()

    def _read_catalog(self) -> RoundPlan:
        """The catalog, validated on the cluster (a bad row stops the job, named, before any model loads);
        the driver keeps each product's text and where its image is, never the image."""
        from caig_ray.actors.catalog import catalog_records, validate_catalog

        check = validate_catalog(self.catalog, self.out / "catalog", "stop", self.image_root)
        return RoundPlan(self.oc, {p.id: p for p in catalog_records(check.valid)})

    def _start(self) -> None:
        """The policy group (at the last checkpoint) and the pipeline for the blocks still to come."""
        from caig_ray.actors.policy import PolicyGroup
        from caig_ray.actors.stream import PairStream, StagedPipeline

        oc = self.oc
        steps = oc.rounds * -(-oc.products_per_round // oc.train_batch_size)  # the lr schedule's length
        self.group = PolicyGroup(self.policy_path, self.cfg.policy, self.cfg.resources.policy, total_steps=steps,
                                 fault=oc.faults.model_dump(mode="json"))
        self.checkpoints.load_into(self.group)
        pipeline = PairStream if oc.pipeline == "streaming" else StagedPipeline
        # the pipeline writes the ads to storage itself (pairs/ads/): no image comes back to the driver
        self.stream = pipeline(self.cfg, self.rm_path, self.plan.n_blocks(self.state), self.store.child("pairs/ads"))
        self.streams.append(self.stream)
        self.feed = Feed(self.cfg, self.group, self.stream)

    def _stop(self) -> None:
        self.stream.close()
        self.group.shutdown()

    def _recover(self, kind: str, error: Exception) -> None:
        """A lost policy rank or feed: back to the last checkpoint, then re-feed every round after it.
        Rounds re-run with the same seeds and weights, so the job ends as an uninterrupted one would."""
        self.recoveries[kind] += 1
        budget = self.oc.max_policy_restarts if kind == "policy" else self.oc.max_feed_restarts
        if self.recoveries[kind] > budget:
            raise RuntimeError(f"{kind} lost {self.recoveries[kind]} times, more than online.max_{kind}_restarts="
                               f"{budget}; last: {error}") from error
        where = self.checkpoints.latest or "the start (no checkpoint yet)"
        logger.warning("recovery %d (%s): %s; restarting from %s", sum(self.recoveries.values()), kind, error, where)
        self._stop()
        self.state = self.checkpoints.restored_state()
        self.log.write("recovery", self.state.step, {"lost": kind, "from_round": self.state.next_round})
        self._start()

    def _evaluate(self, after_rounds: int) -> dict:
        self.evaluator.sample(after_rounds, self.plan, self.group, self.feed, self.state)
        ev = self.evaluator.collect(after_rounds, self.plan, self.feed, self.state)
        self.state.evals.append(ev)
        self.log.write("eval", after_rounds, ev)
        return ev

    def _rounds(self) -> None:
        oc = self.oc
        if self.state.eval_base is None:
            self._evaluate(0)
        start = self.state.next_round
        bar = tqdm(range(start, oc.rounds), desc="online rounds", disable=not self.progress,
                   initial=start, total=oc.rounds)
        for r in bar:
            round_t0 = time.perf_counter()
            wait_before = self.stream.wait_s
            for ahead in range(r, min(r + oc.max_policy_lag, oc.rounds - 1) + 1):
                if ahead not in self.feed.fed_rounds:
                    self.feed.sample_round(ahead, self.plan, self.state)
            info = self.trainer.train_round(r, self.group, self.feed, self.state, round_t0)
            info["round_s"] = time.perf_counter() - round_t0
            info["wait_s"] = self.stream.wait_s - wait_before  # driver blocked on the pipeline
            # on the pool trace's clock (seconds since this pipeline started): bench/pipeline.py's plot
            info["t_start_s"] = round_t0 - self.stream.t0
            info["t_end_s"] = time.perf_counter() - self.stream.t0
            self.state.rounds.append(info)
            self.log.write("round", r, info)
            if self.plan.eval_after(r):
                ev = self._evaluate(r + 1)
                bar.set_postfix(true_ctr=ev.get("true_ctr"), rm_win=round(ev["rm_win_rate"], 3))
            self.state.next_round = r + 1
            if (r + 1) % oc.checkpoint_every == 0 or r == oc.rounds - 1:
                self.checkpoints.save(r, self.group, self.state)
                self._write_record(rounds_done=r + 1)
                if oc.faults.driver_kill_after_round == r and should_fire(oc.faults.marker_dir, "driver"):
                    os.kill(os.getpid(), signal.SIGKILL)

    def run(self) -> dict:
        import ray

        from caig_ray.actors.policy import PolicyRankLost
        from caig_ray.actors.stream import PipelineLost

        t0 = time.perf_counter()
        self.log = RunLog(self.out)
        self.trainer = RoundTrainer(self.cfg, self.out, self.log, self.oracle)
        self.evaluator = Evaluator(self.cfg, self.out, self.oracle)
        self.streams = []
        started = init_ray()
        try:
            self.plan = self._read_catalog()
            self._start()
            try:
                while True:
                    try:
                        self._rounds()
                        break
                    except PolicyRankLost as e:
                        self._recover("policy", e)
                    except PipelineLost as e:
                        self._recover("feed", e)
                policy = self.store.child("policy")  # a plain model folder: --policy OUT/policy
                self.group.save_model(policy.local, policy.uri)
                self._write_record(status="finished", rounds_done=self.state.next_round, finished_at=_now())
            finally:
                self._stop()
            # the pool sizes over time (every pipeline the job ran), as metrics
            pool_trace = [x for st in self.streams for x in st.pool_trace]
            wait_s = sum(st.wait_s for st in self.streams)
            pool_max = max(st.renderer_pool_max for st in self.streams)
            self.pool_sample_errors = sum(st.sample_errors for st in self.streams)
            for i, (t, n_render, n_score) in enumerate(pool_trace):
                self.log.write("pool", i, {"t_s": t, "renderers": n_render, "scorers": n_score})
        finally:
            self.log.close()
            if started:
                ray.shutdown()
        summary = self._summary(time.perf_counter() - t0, pool_trace, wait_s, pool_max)
        self.store.upload(exclude=("checkpoints", "policy"))
        return summary

    def _summary(self, wall_s: float, pool_trace, wait_s: float, pool_max: int) -> dict:
        from caig_ray.report import online_plots, write_run_report

        rounds, evals = self.state.rounds, self.state.evals
        tot = lambda k: sum(r[k] for r in rounds)  # noqa: E731
        summary = {
            "rounds": len(rounds), "steps": self.state.step,
            "true_ctr_by_round": [e.get("true_ctr") for e in evals],
            "base_true_ctr_by_round": [e.get("base_true_ctr") for e in evals],
            "match_rate_by_round": [e.get("match_rate") for e in evals],
            "base_match_rate_by_round": [e.get("base_match_rate") for e in evals],
            "mismatch_share_by_round": [e.get("mismatch_share") for e in evals],
            "base_mismatch_share_by_round": [e.get("base_mismatch_share") for e in evals],
            "mismatch_share_by_category": evals[-1].get("mismatch_share_by_category") if evals else None,
            "base_mismatch_share_by_category": evals[-1].get("base_mismatch_share_by_category") if evals else None,
            "eval_samples": self.oc.eval_samples,
            "rm_win_rate_by_round": [e["rm_win_rate"] for e in evals],
            "eval_after_rounds": [e["after_rounds"] for e in evals],
            "pairs_planned": tot("pairs_planned"), "pairs_rendered": tot("pairs_rendered"),
            "pairs_scored": tot("pairs_scored"), "pairs_trained": tot("pairs_trained"),
            "pairs_skipped": tot("pairs_skipped"), "pairs_lost": tot("pairs_lost"),
            "pairs_skipped_tie": sum(r["skipped_reasons"].get("tie", 0) for r in rounds),
            "pairs_skipped_duplicate": sum(r["skipped_reasons"].get("duplicate", 0) for r in rounds),
            "pairs_duplicated": tot("pairs_duplicated"),
            "renderer_pool_size_max": pool_max, "renderer_pool_trace": pool_trace,
            "pool_sample_errors": self.pool_sample_errors,
            "max_policy_lag": self.oc.max_policy_lag, "policy_lag_steps_max": self.trainer.max_lag_steps,
            "driver_wait_s": wait_s, "render_busy_s": tot("render_busy_s"), "train_s": tot("train_s"),
            "pipeline": self.oc.pipeline, "online_wall_s": wall_s, "policy_path": str(self.store.child("policy")),
            "recoveries": sum(self.recoveries.values()), "recoveries_by_kind": dict(self.recoveries),
            "storage": str(self.store),
        }
        if evals and "lift" in evals[-1]:
            summary["true_ctr_lift"] = evals[-1]["lift"]
        summary["plots"] = online_plots(self.out, rounds, evals, pool_trace)
        summary["report"] = "report.html"
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        self.store.child("pairs/ads").download()  # object-store storage: the pipeline wrote them there
        write_run_report(self.out)
        return summary


def train(cfg: CaigConfig, out: str | Path | Output, policy: str, rm: str, catalog: str, resume: bool = False,
          progress: bool = True, image_root: str | None = None) -> dict:
    """Run the loop; ``out`` is the run folder (relative to ``cfg.storage`` when that is set)."""
    out = out if isinstance(out, Output) else resolve_output(cfg.storage, out)
    return OnlineLoop(cfg, out, policy, rm, catalog, resume, progress, image_root).run()


def main(argv: list[str] | None = None) -> int:
    from caig_ray.world import WorldLayout

    p = argparse.ArgumentParser(prog="caig-ray train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", required=True, help="run folder: a new one (a used folder is refused), or the run's own "
                                              "with --resume")
    p.add_argument("--world", help="a make-world folder: its catalog (over data.catalog)")
    p.add_argument("--catalog", help="catalog (CAIG JSON, parquet or a folder of images); default: --world's, then "
                                     "data.catalog")
    p.add_argument("--image-root", help="where relative image paths are looked up (default: the catalog's "
                                        "folder, then its parent)")
    p.add_argument("--policy", required=True, help="the PM the run starts from and is kept near (its reference): "
                                                 "pretrain-pm --out, or an earlier run's <run>/policy; a folder or "
                                                 "an object-store URI")
    p.add_argument("--rm", help="the reward model (train-rm --out; a folder or an object-store URI); default: "
                                "reward.model_path")
    p.add_argument("--rounds", type=int, help="override online.rounds")
    p.add_argument("--resume", action="store_true",
                   help="continue the run --out holds from its last checkpoint (a finished run is refused; an empty "
                        "or absent --out starts a new run, so a retried job continues its own)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    def job(cfg: CaigConfig, out: Output) -> dict:
        catalog = pick("--catalog", args.catalog or (str(WorldLayout(args.world).catalog) if args.world else None),
                       "data.catalog", cfg.data.catalog)
        rm = pick("--rm", model_arg(args.rm, cfg), "reward.model_path", model_arg(cfg.reward.model_path, cfg))
        return train(cfg, out, model_arg(args.policy, cfg), rm, catalog, args.resume, image_root=args.image_root)

    return run_job(args, job, section="online", overrides={"rounds": args.rounds},
                   upload=False)  # the loop uploads itself; it refuses a used --out itself (--resume)


if __name__ == "__main__":
    sys.exit(main())
