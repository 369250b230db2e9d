"""``ElasticRenderers``: the renderer actor pool, sized by the driver from the backlog it knows.

On an autoscaling cluster (KubeRay's renderer group scales from zero) Ray Data's own actor pool
(``map_renderers``: ``ActorPoolStrategy(min_size, max_size)``) grows late and holds its nodes
(measured in bench/autoscaling.py, Ray 2.60):

- the pool adds an actor only within its resource budget, and the budget is made of the nodes the
  cluster has *now* (``DefaultActorAutoscaler._derive_target_scaling_config`` caps the scale-up by
  ``_get_max_scale_up(actor_pool, budget)``): one GPU node, one actor. New GPU nodes come from Ray
  Data's cluster autoscaler, which asks for at most twice the current throughput, one request per
  10 s (``RateBasedClusterAutoscaler``), and the pool follows them with its own lag. Its bundles
  carry CPU/GPU/memory only, never the ``renderer`` resource, so on a cluster with other GPU
  groups they need not even name a renderer node;
- that cluster autoscaler keeps re-sending its last ``request_resources`` while the dataset runs,
  and the autoscaler never idles out a node a resource request still needs: a job-long pipeline
  (``PairStream``) keeps its peak of renderer nodes until the job ends.

Here the pool is ours (``PairStream``, when ``train`` runs with ``resources.renderers.sizing:
backlog``). The driver knows the backlog (blocks fed, not yet consumed) and says so with
``set_backlog``; the controller keeps ``clamp(ceil(backlog / blocks_per_actor), min_size, max_size)``
renderer actors. An actor the cluster cannot place yet is pending, and pending actors are what the
cluster autoscaler adds nodes for -- all the backlog's nodes at once, at its arrival. When the
backlog is gone the surplus actors (pending first, then idle ones) are killed after
``idle_release_s`` and their nodes go idle; the autoscaler releases them after its idle timeout
(``idleTimeoutSeconds`` on KubeRay). Nothing calls ``request_resources``: Ray Data's coordinator
owns that one cluster-wide request and re-sends it every 20 s, so a second caller would be
overwritten (and would overwrite it).

Ray Data still runs the pipeline: ``map_renderers_elastic`` is a stage of zero-CPU tasks that
borrow a renderer from the controller for each batch (``acquire`` / ``release``); the batch goes
straight to the renderer actor and back, the controller sees only handles. Those tasks, and the
feed's read tasks, stay on the driver's node (``on_driver_node``): Ray Data spreads tasks over all
nodes, and a renderer node with no renderer left on it stayed up (not idle, by the autoscaler's
count) while a read task waited on the feed there (bench/autoscaling.py).

    renderers = ElasticRenderers(cfg.renderer, cfg.resources.renderers, fault)
    ds = ray.data.read_datasource(..., num_cpus=0, **on_driver_node())
    ds = map_renderers_elastic(ds, renderers, batch_size)
    ...  renderers.set_backlog(fed - consumed)  # on every put and every block consumed
    renderers.close()
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from caig_ray.config import ActorPoolConfig, FaultConfig, RendererConfig

RENDERER_ACTOR = "ElasticRenderer"  # the renderer actors' class name in Ray's actor table


class ElasticRenderer:
    """One renderer actor of the elastic pool: the project's ``Renderer`` (a Ray Data map_batches class)."""

    def __init__(self, cfg: RendererConfig, fault: FaultConfig | None, device: str, dtype: str):
        # imported here: the stage's tasks import this module too, and need none of the models
        from caig_ray.actors.renderer import Renderer

        self.renderer = Renderer(cfg, fault, device, dtype)

    def render(self, batch):
        return self.renderer(batch)


@dataclass
class _Member:
    handle: object
    ready: bool = False
    busy: bool = False
    idle_since: float = field(default_factory=time.monotonic)


@ray.remote(num_cpus=0, max_restarts=0)
class RendererPoolController:
    """Keeps the pool at the size the backlog asks for and lends its ready actors out, one batch at a
    time, first come first served (the stage's tasks ask in block order, and the driver consumes in
    block order: a block overtaken by later ones would stall it)."""

    def __init__(self, renderer_cfg: RendererConfig, pool: ActorPoolConfig, fault: FaultConfig | None,
                 idle_release_s: float, blocks_per_actor: float, tick_s: float):
        self.pool = pool
        self.idle_release_s, self.blocks_per_actor = idle_release_s, blocks_per_actor
        # max_restarts / max_task_retries: as Ray Data runs its pool's actors; a renderer that dies
        # (online.faults) comes back and its batch is retried on it
        options = {"num_cpus": self.pool.num_cpus, "num_gpus": self.pool.num_gpus, "max_restarts": -1,
                   "max_task_retries": -1}
        if self.pool.resources:
            options["resources"] = dict(self.pool.resources)
        self.actor_cls = ray.remote(ElasticRenderer).options(**options)
        self.ctor = (renderer_cfg, fault, self.pool.device, self.pool.dtype)
        self.members: dict[int, _Member] = {}
        self.next_key = 0
        self.backlog = 0  # the driver's word: blocks fed and not yet consumed
        self.waiters: deque[asyncio.Future] = deque()  # acquire() calls waiting for a free renderer
        self.surplus_since: float | None = None
        self.started = self.stopped = 0
        self.closed = False
        self.failed: str | None = None  # why a renderer could not start: every acquire() raises it
        self.tick_s, self.ticker = tick_s, None  # started by the first call: __init__ runs outside the event loop

    # ----------------------------------------------------------------------------------- sizing

    def target(self) -> int:
        want = math.ceil(max(self.backlog, len(self.waiters)) / self.blocks_per_actor)
        return min(max(want, self.pool.min_size), self.pool.max_size)

    def _start_one(self) -> None:
        key, self.next_key = self.next_key, self.next_key + 1
        self.members[key] = _Member(self.actor_cls.remote(*self.ctor))
        self.started += 1
        asyncio.get_running_loop().create_task(self._when_ready(key))

    async def _when_ready(self, key: int) -> None:
        member = self.members.get(key)
        if member is None:  # stopped before this task ran
            return
        try:
            await member.handle.__ray_ready__.remote()
        except ray.exceptions.RayActorError as e:
            if self.members.pop(key, None) is not None:  # not stopped by us: its __init__ failed
                # as Ray Data's pool does, a renderer that cannot start ends the stage, rather than
                # being started again and again while the stage's tasks wait
                self._fail(f"a renderer actor failed to start: {e}")
            return
        member = self.members.get(key)
        if member is not None:
            member.ready, member.idle_since = True, time.monotonic()
            self._hand_out()

    def _stop(self, key: int) -> None:
        ray.kill(self.members.pop(key).handle)  # no restart: ray.kill's default
        self.stopped += 1

    def _fail(self, why: str) -> None:
        self.failed = why
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RuntimeError(why))

    def _reconcile(self) -> None:
        if self.closed or self.failed:
            return
        if self.ticker is None:
            self.ticker = asyncio.get_running_loop().create_task(self._tick())
        target, now = self.target(), time.monotonic()
        while len(self.members) < target:
            self._start_one()
        surplus = len(self.members) - target
        if surplus <= 0:
            self.surplus_since = None
            return
        # a backlog that dips between two puts must not cost a node that is on its way: the pool
        # shrinks only after it has been too big for idle_release_s, pending actors first (their
        # nodes may not even be there yet), then the longest idle ones; never a busy one
        self.surplus_since = self.surplus_since or now
        if now - self.surplus_since < self.idle_release_s:
            return
        pending = [k for k, m in self.members.items() if not m.ready]
        idle = sorted((k for k, m in self.members.items() if m.ready and not m.busy
                       and now - m.idle_since >= self.idle_release_s), key=lambda k: self.members[k].idle_since)
        for key in (pending + idle)[:surplus]:
            self._stop(key)

    async def _tick(self) -> None:
        while not self.closed:
            self._reconcile()
            await asyncio.sleep(self.tick_s)

    def _hand_out(self) -> None:
        """Free ready renderers to the longest-waiting acquire() calls."""
        while self.waiters:
            free = [k for k, m in self.members.items() if m.ready and not m.busy]
            if not free:
                return
            waiter = self.waiters.popleft()
            if waiter.done():  # its caller went away
                continue
            key = min(free, key=lambda k: self.members[k].idle_since)  # the longest idle: spread the work
            self.members[key].busy = True
            waiter.set_result(key)

    # ------------------------------------------------------------------------------ driver side

    async def set_backlog(self, blocks: int) -> int:
        self.backlog = max(0, int(blocks))
        self._reconcile()
        return self.target()

    async def stats(self) -> dict:
        members = list(self.members.values())
        return {"target": self.target(), "backlog": self.backlog, "waiting": len(self.waiters),
                "pending": sum(not m.ready for m in members), "ready": sum(m.ready for m in members),
                "busy": sum(m.busy for m in members), "started": self.started, "stopped": self.stopped,
                "failed": self.failed}

    async def close(self) -> None:
        self.closed = True
        for key in list(self.members):
            self._stop(key)
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RuntimeError("the renderer pool is closed"))

    # -------------------------------------------------------------------------- the stage's side

    async def acquire(self) -> tuple[int, object]:
        """A ready, free renderer actor and its key (waits for one, in arrival order); the caller
        gives the key back with ``release``."""
        if self.closed or self.failed:
            raise RuntimeError(self.failed or "the renderer pool is closed")
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self._hand_out()
        self._reconcile()  # a waiting call is backlog too
        key = await waiter
        return key, self.members[key].handle

    async def release(self, key: int) -> None:
        member = self.members.get(key)
        if member is not None:
            member.busy, member.idle_since = False, time.monotonic()
        self._hand_out()
        self._reconcile()


class ElasticRenderers:
    """The driver's side: starts the controller (on the driver's node) and forwards the backlog."""

    def __init__(self, renderer: RendererConfig, pool: ActorPoolConfig, fault: FaultConfig | None = None,
                 idle_release_s: float = 5.0, blocks_per_actor: float = 1.0, tick_s: float = 0.5):
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.pool = pool
        self.controller = RendererPoolController.options(scheduling_strategy=here).remote(
            renderer, pool, fault, idle_release_s, blocks_per_actor, tick_s)

    def set_backlog(self, blocks: int) -> None:
        """Blocks fed and not yet consumed; cheap (fire and forget), call on every put and take."""
        self.controller.set_backlog.remote(blocks)

    def stats(self) -> dict:
        return ray.get(self.controller.stats.remote())

    def alive(self) -> bool:
        return actor_alive(self.controller)

    def close(self) -> None:
        try:
            ray.get(self.controller.close.remote(), timeout=30)
        finally:
            ray.kill(self.controller)


def actor_alive(handle, timeout_s: float = 30) -> bool:
    """Whether the actor answers (a dead one raises; a hung one is counted dead after ``timeout_s``)."""
    try:
        ray.get(handle.__ray_ready__.remote(), timeout=timeout_s)
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False


def _render_on_pool(batch, controller):
    """One batch on a renderer borrowed from the elastic pool (a Ray Data task: it only waits)."""
    key, actor = ray.get(controller.acquire.remote())
    try:
        return ray.get(actor.render.remote(batch))
    finally:
        controller.release.remote(key)


def on_driver_node() -> dict:
    """``label_selector`` for a Ray Data stage whose tasks only wait (the feed's read tasks, this
    stage): on the driver's node. Ray Data spreads tasks over every node, and a renderer node that
    runs one, even with zero CPUs, does not count idle: the autoscaler keeps it."""
    from ray.util.placement_group import NODE_ID_LABEL_KEY

    return {"label_selector": {NODE_ID_LABEL_KEY: ray.get_runtime_context().get_node_id()}}


def map_renderers_elastic(ds, renderers: ElasticRenderers, batch_size: int | None):
    """``map_renderers`` on the elastic pool: a stage of zero-CPU tasks, one per renderer the pool may
    have and two more (a renderer's next batch is on its way while it renders), on the driver's node
    (``on_driver_node``)."""
    return ds.map_batches(_render_on_pool, fn_kwargs={"controller": renderers.controller}, batch_size=batch_size,
                          compute=ray.data.TaskPoolStrategy(size=renderers.pool.max_size + 2), num_cpus=0,
                          **on_driver_node())
