"""The online algorithm (``caig_ray/loop/``) without Ray: the same parts ``caig-ray train`` runs --
plan, feed, train, evaluate, checkpoint -- driven with an in-process policy (one rank's
``PolicyEngine``, DeepSpeed over a one-rank gloo group, what each ``PolicyWorker`` holds) and an
in-process pipeline (the ``Renderer`` and ``RewardScorer`` classes the Ray Data pools run, called on
each block as Ray Data hands it over)."""

import json
import os
import socket
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from caig_ray.config import load_config
from caig_ray.data import read_catalog
from caig_ray.data.catalog import ProductRecord
from caig_ray.rows import CandidatePair, PairRecord, PreferenceExample, ScoredPair, eval_table


def _comparable(row) -> dict:
    """A row's values with NaN made comparable (NaN != NaN)."""
    return {k: "nan" if isinstance(v, float) and v != v else v for k, v in row.to_row().items()}
from caig_ray.storage import Output


class InProcessPipeline:
    """``caig_ray.loop.Pipeline`` in this process: each block goes through the renderer and the
    scorer as a dict of numpy columns (Ray Data's batch format) and comes back as rows, in feed order."""

    def __init__(self, cfg, rm_path: str, ads: Output):
        from caig_ray.actors.renderer import Renderer
        from caig_ray.actors.scorer import RewardScorer

        self.renderer = Renderer(cfg.renderer)
        self.scorer = RewardScorer(rm_path, batch_size=cfg.online.scorer_batch_size, debias=cfg.online.debias_rm,
                                   ads=ads)
        self.done: list[list[dict]] = []
        self.candidates, self.scored = [], []  # every row that went in and came out, for the round trip
        self.t0, self.wait_s, self.fed = time.perf_counter(), 0.0, 0

    def put(self, rows) -> int:
        table = CandidatePair.table(rows)  # the columns FeedDatasource hands the renderer pool
        batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
        out = self.scorer(self.renderer(batch))
        table = pa.Table.from_pydict({k: list(v) for k, v in out.items()})
        assert sorted(table.schema.names) == sorted(ScoredPair.SCHEMA.names)  # a ScoredPair, column for column
        self.done.append([ScoredPair.from_row(r) for r in table.to_pylist()])
        self.candidates += rows
        self.scored += self.done[-1]
        self.fed += 1
        return self.fed - 1

    def next_block(self):
        return self.done.pop(0)


class InProcessPolicy:
    """``caig_ray.loop.Policy`` in this process: one rank's ``PolicyEngine``."""

    def __init__(self, model_path: str, cfg, total_steps: int):
        import torch.distributed as dist

        from caig_ray.ds import init_distributed
        from caig_ray.policy_engine import PolicyEngine

        if not dist.is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            init_distributed(use_gpu=False)
        self.engine = PolicyEngine(model_path, cfg.policy, cfg.resources.policy, 0, total_steps)
        self.examples = []  # every PreferenceExample trained on

    def generate(self, products, n, temperature, seed):
        from caig_ray.actors.policy import with_images

        return self.engine.generate(with_images(products), n, temperature, seed)

    def train_step(self, examples):
        from caig_ray.actors.policy import with_images

        self.examples += examples
        return self.engine.train_step(with_images(examples))

    def save(self, path, uri=None):
        self.engine.save(str(path))

    def load(self, path, uri=None):
        self.engine.load(str(path))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_loop_parts_run_two_rounds_and_an_evaluation_in_process(quick_world, tmp_path):
    from caig_ray.loop import Checkpoints, Evaluator, Feed, RoundPlan, RoundTrainer, RunLog
    from caig_ray.online import MarketOracle, RunState

    # tie_margin None (CAIG scripts' rule): the random PM's two samples often render the same plain ad, a
    # tie the default would skip; here the loop must take steps
    cfg = load_config("quick", overrides={"online": {"rounds": 2, "products_per_round": 8, "eval_products": 4,
                                                     "eval_samples": 2, "pairs_per_batch": 4, "train_batch_size": 3,
                                                     "tie_margin": None},
                                          "resources": {"policy": {"num_workers": 1}}})
    oc = cfg.online
    (tmp_path / "images").mkdir()
    products = {}
    for p in read_catalog(quick_world.catalog)[:16]:
        path = tmp_path / "images" / f"{p.id}.png"
        p.image.save(path)
        products[p.id] = ProductRecord(p.id, p.title, p.category, p.attributes, str(path))
    out = tmp_path / "run"
    (out / "pairs").mkdir(parents=True)
    store = Output(out)
    plan = RoundPlan(oc, products)
    state = RunState(run_id="r-test")
    oracle = MarketOracle(cfg.market)
    log = RunLog(out)
    policy = InProcessPolicy(str(quick_world.policy), cfg, total_steps=8)
    pipeline = feed_log = InProcessPipeline(cfg, str(quick_world.reward), store.child("pairs/ads"))
    feed = Feed(cfg, policy, pipeline)
    trainer, evaluator = RoundTrainer(cfg, out, log, oracle), Evaluator(cfg, out, oracle)
    assert len(plan.eval_ids) == 4 and not set(plan.eval_ids) & set(plan.train_ids)

    # round 0 is fed before the evaluation, so the evaluation's blocks come out behind round 0's:
    # Feed.take keeps round 0's rows aside while it waits for the evaluation's, then hands them to training
    feed.sample_round(0, plan, state)
    evaluator.sample(0, plan, policy, feed, state)
    ev = evaluator.collect(0, plan, feed, state)
    assert 0 <= ev["rm_win_rate"] <= 1 and {"true_ctr", "base_true_ctr", "lift", "mismatch_share"} <= set(ev)
    assert ev["lift"]["diff"] == pytest.approx(0.0, abs=1e-12)  # before training both sides are the same PM
    assert pq.read_metadata(out / "pairs" / "eval_000.parquet").num_rows == 4 * oc.eval_samples
    assert feed.buffer[("train", 0)]

    for r in range(oc.rounds):
        if r not in feed.fed_rounds:
            feed.sample_round(r, plan, state)
        info = trainer.train_round(r, policy, feed, state, time.perf_counter())
        state.next_round = r + 1
        assert info["pairs_planned"] == 8 and info["pairs_lost"] == 0 and info["pairs_duplicated"] == 0
        assert info["pairs_trained"] + info["pairs_skipped"] == 8 and info["pairs_rendered"] == 8
        rows = pq.read_table(out / "pairs" / f"round_{r:03d}.parquet").to_pylist()
        assert len(rows) == 8 and all(x["status"] == "trained" or x["status"].startswith("skipped:") for x in rows)
        assert all((x["status"] == "trained") == (x["trained_at_step"] > 0) for x in rows)
        assert all("true_ctr_a" in x and x["ads_part"] for x in rows)
    log.close()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["kind"] == "train"]
    trained = sum(1 for r in range(oc.rounds) for x in pq.read_table(out / "pairs" / f"round_{r:03d}.parquet")
                  .to_pylist() if x["status"] == "trained")
    # every trained pair in exactly one step; a step takes train_batch_size, the round's last up to 2x-1
    assert len(steps) == state.step >= 2 and sum(s["n_examples"] for s in steps) == trained
    assert all(1 <= s["n_examples"] <= 2 * oc.train_batch_size - 1 for s in steps)
    assert all(np.isfinite(s["loss"]) for s in steps)

    # every row type, as the run made it, round-trips through its Arrow schema
    assert pq.read_schema(out / "pairs" / "round_000.parquet").equals(PairRecord.SCHEMA)
    assert pq.read_schema(out / "pairs" / "eval_000.parquet").names == eval_table([], []).schema.names
    pending = [c for rows in state.pending.values() for c in rows] or feed_log.candidates
    for kind, rows in ((CandidatePair, feed_log.candidates), (ScoredPair, feed_log.scored),
                       (PreferenceExample, policy.examples)):
        assert rows, kind
        back = [kind.from_row(r) for r in kind.table(rows).to_pylist()]
        assert [_comparable(b) for b in back] == [_comparable(r) for r in rows], kind
    assert pending

    ckpts = Checkpoints(store, keep=1, run_id="r-test", resume=False)
    ckpts.save(oc.rounds - 1, policy, state)
    again = Checkpoints(store, keep=1, run_id="r-test", resume=True)
    assert again.restored_state().to_json() == state.to_json()
    assert again.restored_state().pending == {}  # every sampled round was trained
    assert Checkpoints(store, keep=1, run_id="another-run", resume=True).latest is None  # never another run's
