"""The online CTR-driven loop: ``python -m caig_ray.jobs.train`` / ``caig-ray train``.

Per round (CAIG): the policy samples N=2 descriptions per product (T=1.0); both are rendered with
the same seed by a Ray Data renderer pool; the frozen RM (a scorer pool) picks chosen/rejected;
duplicates are skipped and counted; DPO+PCPO steps train the policy (DeepSpeed ZeRO in a
``PolicyGroup``) as soon as scored blocks arrive; the reference stays the ``--policy`` the run started
from (the pretrained PM, or an earlier run's policy a weekly run continues from). The pools
live for the whole job (``dataplane/stream.py``). ``online.max_policy_lag`` rounds may be sampled
ahead of training (0 = CAIG's strict rounds).

Every ``online.eval_every`` rounds (and before the first) the policy writes one description per
held-out product with a fixed sampling seed; its ad is rendered beside the pretrained PM's (same
render seed) and scored by the RM (win rate); on the simulated market the oracle gives true CTR
and match. Checkpoints (policy, optimizer, round, data position, pending samples) every
``online.checkpoint_every`` rounds; a run folder holds one run (``run.json``: id, status, rounds done):
a fresh run refuses a used folder, ``--resume`` continues the folder's run from its last checkpoint and
refuses a finished one (docs/operations.md).

The driver is the control plane: the catalog is validated on the cluster (``catalog/valid`` and
``catalog/rejects`` parts, dataplane/catalog.py) and the driver keeps ids, titles and an image reference
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

from tqdm.auto import tqdm

from caig_ray.config import CaigConfig, load_config, save_config
from caig_ray.faults import should_fire
from caig_ray.loop import (Checkpoints, Evaluator, Feed, RoundPlan, RoundTrainer, RunLog, check_same_run,
                           claim_run_folder, run_summary, write_run_record)
from caig_ray.online import MarketOracle
from caig_ray.storage import Output, resolve_output
from caig_ray.jobs._entry import model_arg, pick, add_config_args, run_job
from caig_ray.jobs._ray import init_ray

logger = logging.getLogger(__name__)


class OnlineLoop:
    """The job: checks, then plan -> feed -> train -> evaluate -> checkpoint, round by round, with
    in-job recovery from a lost policy rank or feed. The parts above hold the work; this class holds
    the run's state (``RunState``) and the live policy group and pipeline."""

    def __init__(self, cfg: CaigConfig, out: Output, policy: str, rm: str, catalog: str, resume: bool,
                 progress: bool = True, image_root: str | None = None):
        self.cfg, self.oc, self.store, self.out, self.policy_path, self.rm_path = (
            cfg, cfg.online, out, out.local, policy, rm)
        self.catalog, self.image_root, self.progress = catalog, image_root, progress
        self.record = claim_run_folder(out, cfg.online.rounds, resume)
        if out.staged:  # the object store is the run: the local staging copy (our cache, not an output) is rebuilt from it
            shutil.rmtree(self.out, ignore_errors=True)
            if resume:
                out.download(exclude=("checkpoints", "policy"))
        from caig_ray.models.renderer import check_sd_folders
        from caig_ray.models.folders import check_model_folder

        check_model_folder(policy, "--policy (the pretrained PM)", kind="policy")
        check_model_folder(rm, "--rm (the trained reward model)", kind="reward")
        if cfg.renderer.kind == "diffusers":
            check_sd_folders(cfg.renderer)
        if resume and (self.out / "config.yaml").exists():
            # the run's own record of its whole config (base: none; a run folder from before bases: the same)
            check_same_run(load_config(self.out / "config.yaml", preset="none"), cfg, self.store.child("config.yaml"))
        self.oracle = MarketOracle(cfg.market) if cfg.renderer.kind == "procedural" else None
        for sub in ("checkpoints", "pairs", "plots"):  # only now: a refused start leaves the folder as it was
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.checkpoints = Checkpoints(self.store, self.oc.keep_checkpoints, self.record.run_id, resume)
        self.state = self.checkpoints.restored_state()
        self._write_record()
        self.recoveries = {"policy": 0, "feed": 0}
        save_config(cfg, self.out / "config.yaml")

    def _write_record(self, **changes) -> None:
        write_run_record(self.store, self.record, **changes)

    def _read_catalog(self) -> RoundPlan:
        """The catalog, validated on the cluster (a bad row stops the job, named, before any model loads);
        the driver keeps each product's text and where its image is, never the image."""
        from caig_ray.dataplane.catalog import catalog_records, validate_catalog

        check = validate_catalog(self.catalog, self.out / "catalog", "stop", self.image_root)
        return RoundPlan(self.oc, {p.id: p for p in catalog_records(check.valid)})

    def _start(self) -> None:
        """The policy group (at the last checkpoint) and the pipeline for the blocks still to come."""
        from caig_ray.actors.policy import PolicyGroup
        from caig_ray.dataplane.stream import PairStream, StagedPipeline

        oc = self.oc
        steps = oc.rounds * -(-oc.products_per_round // oc.train_batch_size)  # the lr schedule's length
        self.group = PolicyGroup(self.policy_path, self.cfg.policy, self.cfg.resources.policy, total_steps=steps,
                                 fault=oc.faults)
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
        from caig_ray.dataplane.stream import PipelineLost

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
                self._write_record(finished=True, rounds_done=self.state.next_round)
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

        summary = run_summary(self.oc, self.state, wall_s=wall_s, pool_trace=pool_trace, pool_max=pool_max,
                              pool_sample_errors=self.pool_sample_errors, wait_s=wait_s,
                              max_lag_steps=self.trainer.max_lag_steps, recoveries=self.recoveries,
                              policy_path=str(self.store.child("policy")), storage=str(self.store))
        summary["plots"] = online_plots(self.out, self.state.rounds, self.state.evals, pool_trace)
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
