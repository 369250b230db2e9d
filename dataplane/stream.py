"""``PairStream``: one long-lived Ray Data pipeline for the whole online job.

    driver --put(block)--> PairFeed (actor) --FeedDatasource--> map_batches(Renderer, actor pool)
           --> map_batches(RewardScorer, actor pool: scores, then writes the block's ads to storage)
           --iter_batches--> driver (trainer): ids, descriptions, RM probabilities, no image

A Ray Data execution starts and tears down its actor pools, so one execution per round would
reload the renderer and RM every round. Instead the dataset's source is ``FeedDatasource``: its
read task ``i`` waits on the ``PairFeed`` actor for block ``i``, which the driver puts there when
the policy has sampled it. The number of blocks the job will feed is known up front (rounds x
blocks per round + evaluations), so the dataset is finite and ends when the job does. Blocks come
out in feed order (``preserve_order``): the data order a job trains on does not depend on which
renderer finished first, so a resumed job trains on exactly what an uninterrupted one would.

A block stays in the feed until the driver has consumed it, so a read task Ray retries still finds it.

The renderer pool is Ray Data's own (``resources.renderers.sizing: ray_data``) or, with ``backlog``,
``ElasticRenderers`` (dataplane/elastic.py), which the driver sizes from the blocks it has fed and not
yet consumed: the render stage's tasks then borrow a renderer per block. Same blocks, same order,
same renders either way (tests/test_online_loop.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import ray
from ray.data import ActorPoolStrategy
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from caig_ray.actors.renderer import Renderer
from caig_ray.config import ActorPoolConfig, CaigConfig, FaultConfig, RendererConfig
from caig_ray.dataplane.elastic import (RENDERER_ACTOR, ElasticRenderers, actor_alive, map_renderers_elastic,
                                        on_driver_node)
from caig_ray.faults import BatchFault
from caig_ray.rows import CandidatePair, ScoredPair
from caig_ray.storage import Output


class PipelineLost(RuntimeError):
    """The ``PairFeed`` actor died: the pipeline's blocks in flight are gone (the job recovers from
    its last checkpoint and re-feeds)."""


@ray.remote(num_cpus=0, max_restarts=0)
class PairFeed:
    """Blocks of candidate pairs by index; ``get(i)`` waits until the driver has put block ``i``."""

    def __init__(self, fault: FaultConfig | None = None):
        self.blocks: dict[int, list[CandidatePair]] = {}
        self.events: dict[int, asyncio.Event] = {}
        self.fault = BatchFault.of(fault, "feed", "feed_die_after_blocks")
        self.puts = 0

    def _event(self, i: int) -> asyncio.Event:
        return self.events.setdefault(i, asyncio.Event())

    async def put(self, i: int, rows: list[CandidatePair]) -> None:
        if self.puts > 0:  # dies when block k+1 comes, after k were put
            self.fault.tick()
        self.puts += 1
        self.blocks[i] = rows
        self._event(i).set()

    async def get(self, i: int) -> list[CandidatePair]:
        await self._event(i).wait()
        return self.blocks[i]

    async def drop(self, i: int) -> None:
        self.blocks.pop(i, None)
        self.events.pop(i, None)


class FeedDatasource(Datasource):
    """A Ray Data source of ``n_blocks`` blocks that are produced while the dataset runs."""

    def __init__(self, feed, n_blocks: int):
        super().__init__()
        self.feed, self.n_blocks = feed, n_blocks

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        feed = self.feed

        def read_task(i: int) -> ReadTask:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return ReadTask(lambda: [CandidatePair.table(ray.get(feed.get.remote(i)))], meta)

        return [read_task(i) for i in range(self.n_blocks)]


def map_pool(ds, fn, pool: ActorPoolConfig, batch_size: int | None = None, **kwargs):
    """``ds.map_batches(fn)`` on the actor pool ``pool`` describes (size range, CPUs, GPUs, resources).

    ``batch_size`` None: each call takes one whole block, as the driver (or the catalog source) cut it,
    so no stage waits to fill a larger batch and a round's short last block is not held back to be
    bundled with the next round's. Ray's public ``map_batches`` refuses ``batch_size=None`` for a stage
    that asks for GPUs (a guard against accidental huge batches); ``map_batches_internal`` is the same
    operator without that guard -- Ray's own ``map_groups`` takes it for GPU stages. With an int the
    public call is used (it then bundles blocks up to that many rows)."""
    args = {**pool_args(pool), **kwargs}
    if batch_size is None:
        return ds.map_batches_internal(fn, batch_size=None, **args)
    return ds.map_batches(fn, batch_size=batch_size, **args)


def map_renderers(ds, renderer: RendererConfig, pool: ActorPoolConfig, batch_size: int | None,
                  fault: FaultConfig | None = None, stage: type = Renderer, **kwargs):
    """``ds.map_batches(stage)`` on an autoscaling actor pool (``pool``): ``Renderer`` for the online
    loop's pairs, ``CandidateRenderer`` for generate's products; ``batch_size`` None keeps the dataset's
    blocks as the batches."""
    return map_pool(ds, stage, pool, batch_size,
                    fn_constructor_args=(renderer, fault, pool.device, pool.dtype), **kwargs)


def map_scorers(ds, cfg: CaigConfig, rm_path: str, batch_size: int | None, ads: Output | None = None):
    """``ds.map_batches(RewardScorer)`` on the ``resources.scorers`` actor pool; with ``ads`` the scorer
    writes each block's ads there once scored and passes the rows on without them."""
    # imported here: the feed's actor and read tasks import this module and need no model stack
    from caig_ray.actors.scorer import RewardScorer

    oc, pool = cfg.online, cfg.resources.scorers
    kwargs = {"model_path": rm_path, "batch_size": oc.scorer_batch_size, "dtype": pool.dtype,
              "device": pool.device, "debias": oc.debias_rm, "fault": oc.faults,
              "ads": ads}
    return map_pool(ds, RewardScorer, pool, batch_size, fn_constructor_kwargs=kwargs)


def render_and_score(ds, cfg: CaigConfig, rm_path: str, ads: Output, renderers=None):
    """The online loop's two model stages on their pools, each call one whole block (``map_pool``);
    with ``renderers`` (an ``ElasticRenderers``, ``resources.renderers.sizing: backlog``) the blocks
    are rendered on that backlog-sized pool instead of Ray Data's."""
    if renderers is None:
        ds = map_renderers(ds, cfg.renderer, cfg.resources.renderers, None, cfg.online.faults)
    else:
        ds = map_renderers_elastic(ds, renderers, None)
    return map_scorers(ds, cfg, rm_path, None, ads)


def pool_args(pool: ActorPoolConfig) -> dict:
    extra = {"resources": pool.resources} if pool.resources else {}
    return {"compute": ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
            "num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, **extra}


def _pool_sizes() -> tuple[int, int]:
    """Alive renderer actors (of Ray Data's pool or the backlog-sized one) and scorer actors (GCS actor
    table; no dashboard needed)."""
    from ray._private import state

    alive = [a["ActorClassName"] for a in state.actors().values() if a["State"] == "ALIVE"]
    return (sum("MapBatches(Renderer)" in n or n == RENDERER_ACTOR for n in alive),
            sum("MapBatches(RewardScorer)" in n for n in alive))


def _ray_data_settings() -> None:
    """The pipeline's Ray Data settings, set before its datasets are built (a Dataset keeps a copy of
    the context it was created under): blocks come out in the order they were fed, and no progress
    bars (the driver shows round-level progress instead)."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False


class _PoolTrace:
    """Samples the pools' sizes every ``every`` seconds in a thread while a pipeline runs."""

    def __init__(self, every: float):
        self.t0 = time.perf_counter()
        self.pool_trace: list[tuple[float, int, int]] = []  # (seconds since start, renderers, scorers)
        self.sample_errors = 0  # failed reads of the actor table (e.g. while Ray shuts down); reported
        self.wait_s = 0.0  # time the driver spent blocked waiting for a scored block
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, args=(every,), daemon=True)
        self._sampler.start()

    def _sample(self, every: float) -> None:
        while not self._stop.is_set():
            try:
                r, s = _pool_sizes()
                self.pool_trace.append((time.perf_counter() - self.t0, r, s))
            except (ray.exceptions.RaySystemError, ConnectionError, RuntimeError):
                self.sample_errors += 1
            self._stop.wait(every)

    def _stop_sampling(self) -> None:
        self._stop.set()
        self._sampler.join(timeout=5)

    @property
    def renderer_pool_max(self) -> int:
        return max((r for _, r, _ in self.pool_trace), default=0)


class PairStream(_PoolTrace):
    """The job-long render-and-score pipeline (see the module docstring)."""

    def __init__(self, cfg: CaigConfig, rm_path: str, n_blocks: int, ads: Output, sample_every_s: float = 0.25):
        oc = cfg.online
        pool = cfg.resources.renderers
        self.n_blocks, self.fed, self.consumed = n_blocks, 0, 0
        self.feed = PairFeed.remote(oc.faults)
        self.renderers, where = None, {}
        super().__init__(sample_every_s)
        _ray_data_settings()
        if pool.sizing == "backlog":  # the driver sizes the renderer pool (dataplane/elastic.py)
            self.renderers = ElasticRenderers(cfg.renderer, pool, oc.faults, idle_release_s=pool.idle_release_s)
            where = on_driver_node()  # a read task waiting on a renderer node would keep that node up
        logging.getLogger(__name__).info("renderer pool: %d..%d actors, sized by %s (resources.renderers.sizing %s)",
                                         pool.min_size, pool.max_size,
                                         "the driver's backlog" if self.renderers else "Ray Data", pool.sizing)
        # read tasks waiting on the feed at once: the blocks the renderer pool's autoscaler can see queued
        # (2 hid a round's backlog from a pool of 8: it grew to 3)
        ds = ray.data.read_datasource(FeedDatasource(self.feed, n_blocks), override_num_blocks=n_blocks,
                                      concurrency=max(2, pool.max_size), num_cpus=0, **where)
        ds = render_and_score(ds, cfg, rm_path, ads, self.renderers)
        self._it = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))

    def put(self, rows: list[CandidatePair]) -> int:
        """Feed one block (a render and score batch); returns its index."""
        if self.fed >= self.n_blocks:
            raise RuntimeError(f"PairStream planned {self.n_blocks} blocks; a block more was fed (driver bug)")
        if not rows:
            raise ValueError("PairStream.put got an empty block")
        try:
            ray.get(self.feed.put.remote(self.fed, rows))
        except ray.exceptions.RayActorError as e:
            raise PipelineLost(f"the PairFeed actor died: {e}") from e
        self.fed += 1
        self._tell_backlog()
        return self.fed - 1

    def _tell_backlog(self) -> None:
        if self.renderers is not None:
            self.renderers.set_backlog(self.fed - self.consumed)

    def next_block(self) -> list[ScoredPair]:
        """The next scored block in feed order (blocks until it is ready)."""
        if self.consumed >= self.fed:
            raise RuntimeError("PairStream.next_block: every fed block was consumed; feed more first (driver bug)")
        t = time.perf_counter()
        try:
            table = next(self._it)
        except Exception as e:  # a read task that waited on a dead feed fails inside Ray Data
            if not actor_alive(self.feed):
                raise PipelineLost(f"the PairFeed actor died; the pipeline failed with: {e}") from e
            if self.renderers is not None:
                if not self.renderers.alive():
                    raise PipelineLost(f"the renderer pool's controller died; the pipeline failed with: {e}") from e
                if why := self.renderers.stats()["failed"]:
                    raise RuntimeError(f"the renderer pool failed: {why}") from e
            raise
        self.wait_s += time.perf_counter() - t
        self.feed.drop.remote(self.consumed)
        self.consumed += 1
        self._tell_backlog()
        return [ScoredPair.from_row(r) for r in table.to_pylist()]

    def close(self) -> None:
        """Stop the sampler, end the Ray Data execution (closing the iterator shuts its actor pools
        down) and kill the feed; safe on a broken pipeline."""
        self._stop_sampling()
        if self._it is not None and hasattr(self._it, "close"):
            try:
                self._it.close()
            except Exception:  # noqa: BLE001 -- a failed execution may raise again while closing; it is over
                logging.getLogger(__name__).debug("closing a failed Ray Data iterator", exc_info=True)
        self._it = None
        if self.renderers is not None:
            try:
                self.renderers.close()
            except ray.exceptions.RayError:  # a controller lost with the pipeline; its actors die with it
                logging.getLogger(__name__).debug("closing the backlog-sized renderer pool", exc_info=True)
        ray.kill(self.feed)


class StagedPipeline(_PoolTrace):
    """CAIG's scripts, for comparison (``online.pipeline: sequential``): everything put so far is
    rendered in one Ray Data run, then scored in another, before the first block comes back. Same
    blocks, same order, same actors and models as ``PairStream``; only the overlap differs."""

    def __init__(self, cfg: CaigConfig, rm_path: str, n_blocks: int, ads: Output, sample_every_s: float = 0.25):
        self.cfg, self.rm_path, self.n_blocks, self.ads = cfg, rm_path, n_blocks, ads
        self.pending: list[list[CandidatePair]] = []
        self.ready: list[list[ScoredPair]] = []
        self.fed = self.consumed = 0
        super().__init__(sample_every_s)
        _ray_data_settings()

    def put(self, rows: list[CandidatePair]) -> int:
        self.pending.append(rows)
        self.fed += 1
        return self.fed - 1

    def _run_stages(self) -> None:
        oc = self.cfg.online
        sizes = [len(b) for b in self.pending]
        ds = ray.data.from_arrow([CandidatePair.table(b) for b in self.pending])
        rendered = map_renderers(ds, self.cfg.renderer, self.cfg.resources.renderers, oc.pairs_per_batch,
                                 oc.faults).take_all()
        scored = map_scorers(ray.data.from_items(rendered, override_num_blocks=len(self.pending)), self.cfg,
                             self.rm_path, oc.pairs_per_batch, self.ads).take_all()
        if len(scored) != sum(sizes):
            raise RuntimeError(f"sequential pipeline: {sum(sizes)} pairs in, {len(scored)} out")
        start = 0
        for n in sizes:  # back into the blocks the driver put, in order
            self.ready.append([ScoredPair.from_row(r) for r in scored[start:start + n]])
            start += n
        self.pending = []

    def next_block(self) -> list[ScoredPair]:
        if self.consumed >= self.fed:
            raise RuntimeError("StagedPipeline.next_block: every fed block was consumed (driver bug)")
        t = time.perf_counter()
        if not self.ready:
            self._run_stages()
        self.wait_s += time.perf_counter() - t
        self.consumed += 1
        return self.ready.pop(0)

    def close(self) -> None:
        self._stop_sampling()
