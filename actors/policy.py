"""``PolicyGroup`` / ``PolicyWorker``: the prompt model under DeepSpeed ZeRO in N Ray actors.

The OpenRLHF pattern: the actors sit in a placement group; rank 0 picks MASTER_ADDR/PORT; every
rank sets RANK/WORLD_SIZE/LOCAL_RANK, calls ``deepspeed.init_distributed`` and then
``deepspeed.initialize`` with the ZeRO stage from config. Each worker also holds a frozen
reference model (the pretrained PM, fixed for all rounds). The driver fans step-level calls out to
all ranks (every rank must take part in ZeRO collectives) and gathers the results.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from caig_ray.config import FaultConfig, PolicyConfig, WorkerGroupPlacement
from caig_ray.losses import pcpo_kind_means
from caig_ray.data.catalog import load_product_image
from caig_ray.ds import WORKER_ENV
from caig_ray.rows import PreferenceExample, ProductPrompt
from caig_ray.faults import BatchFault
from caig_ray.storage import Output


class PolicyRankLost(RuntimeError):
    """A PolicyWorker process died: the group is unusable (ZeRO needs every rank) and was shut down."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def with_images(items: list) -> list:
    """``ProductPrompt``s to describe or ``PreferenceExample``s to train on that say where their image is
    (``image_ref``: the online loop's driver never holds an image) get it here, on the rank that uses it."""
    return [_with_image(x) for x in items]


def _with_image(x: ProductPrompt | PreferenceExample) -> ProductPrompt | PreferenceExample:
    return dataclasses.replace(x, image=load_product_image(x.image_ref)) if x.image is None else x


class PolicyWorker:
    """A Ray actor holding one rank's ``PolicyEngine`` (caig_ray/policy_engine.py)."""

    def __init__(self, rank: int, world_size: int, model_path: str, cfg: PolicyConfig,
                 placement: WorkerGroupPlacement, total_steps: int = 1, fault: FaultConfig | None = None):
        self.rank, self.world_size, self.model_path = rank, world_size, model_path
        self.cfg, self.placement = cfg, placement
        self.total_steps = total_steps
        # online.faults.policy_rank_die_at_step: armed on the last rank only
        self.fault = BatchFault.of(fault, "policy_rank", "policy_rank_die_at_step", armed=rank == world_size - 1)

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def init_engine(self, master_addr: str, master_port: int) -> None:
        from caig_ray.ds import init_distributed
        from caig_ray.policy_engine import PolicyEngine

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          # Ray gives each actor its own GPU as cuda:0 (CUDA_VISIBLE_DEVICES), so local rank 0
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        init_distributed(self.placement.use_gpu)
        self.policy = PolicyEngine(self.model_path, self.cfg, self.placement, self.rank, self.total_steps)

    def generate(self, products: list[ProductPrompt], n: int, temperature: float, seed: int) -> list[dict]:
        return self.policy.generate(with_images(products), n, temperature, seed)

    def train_step(self, examples: list[PreferenceExample], n_micro: int | None = None) -> dict:
        self.fault.tick()
        return self.policy.train_step(with_images(examples), n_micro)

    def logps(self, examples: list[PreferenceExample]) -> list[float]:
        return self.policy.logps(with_images(examples))

    def save(self, path: str) -> None:
        self.policy.save(path)

    def save_model(self, path: str) -> None:
        self.policy.save_model(path)

    def load(self, path: str) -> None:
        self.policy.load(path)

    def upload(self, path: str, uri: str) -> None:
        """Upload what this node holds of ``path`` to ``uri`` (object-store storage)."""
        Output(Path(path), uri).upload()

    def fetch(self, path: str, uri: str) -> None:
        """Download ``uri`` to ``path`` on this node (file by file, each replaced atomically)."""
        if not Output(Path(path), uri).download():
            raise FileNotFoundError(f"nothing in storage at {uri}")


class PolicyGroup:
    """N ``PolicyWorker`` actors in a placement group; calls fan out to every rank."""

    def __init__(self, model_path: str | Path, cfg: PolicyConfig, placement: WorkerGroupPlacement,
                 total_steps: int = 1, ready_timeout_s: float = 120, fault: FaultConfig | None = None):
        self.cfg, self.n = cfg, placement.num_workers
        bundle = {"CPU": placement.num_cpus, **({"GPU": placement.num_gpus} if placement.use_gpu else {})}
        self.pg = placement_group([bundle] * self.n, strategy=placement.placement_strategy)
        try:
            ray.get(self.pg.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"PolicyGroup: {self.n} bundles of {bundle} could not be placed within {ready_timeout_s:.0f} s; "
                f"available now: {ray.available_resources()}") from None
        actor = ray.remote(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), max_restarts=0)(PolicyWorker)
        env = {"env_vars": dict(WORKER_ENV)}
        self.workers = [
            actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=r), runtime_env=env,
            ).remote(r, self.n, str(model_path), cfg, placement, total_steps, fault)
            for r in range(self.n)
        ]
        addr, port = ray.get(self.workers[0].address.remote())  # rank 0 picks MASTER_ADDR/PORT
        self._gather([w.init_engine.remote(addr, port) for w in self.workers])

    def _gather(self, refs: list, grace_s: float = 30) -> list:
        """``ray.get(refs)``, but a dead rank raises ``PolicyRankLost`` (after shutting the group down)
        instead of leaving the others blocked in a collective. A rank's own error (say gloo's "connection
        closed" when its peer died) is checked against the others for ``grace_s`` before it is re-raised."""
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                self.shutdown()
                raise PolicyRankLost(f"a policy rank died: {e}") from e
            except ray.exceptions.RayTaskError as e:
                for ref in pending:
                    try:
                        ray.get(ref, timeout=grace_s)
                    except ray.exceptions.RayActorError as lost:
                        self.shutdown()
                        raise PolicyRankLost(f"a policy rank died: {lost}") from lost
                    except (ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError):
                        continue
                raise e
        return ray.get(refs)

    def _split(self, items: list) -> list[list]:
        """Contiguous, near-equal shards, one per rank; every rank gets at least one item (a short
        list is padded by repeating its first item, whose results are dropped)."""
        if not items:
            raise ValueError("nothing to split across ranks")
        k, extra = divmod(len(items), self.n)
        shards, start = [], 0
        for r in range(self.n):
            size = k + (1 if r < extra else 0)
            shards.append(items[start:start + size] or [items[0]])
            start += size
        return shards

    def generate(self, products: list[ProductPrompt], n: int = 2, temperature: float = 1.0, seed: int = 0) -> list[dict]:
        shards = self._split(products)
        outs = self._gather([w.generate.remote(s, n, temperature, seed + 1000 * r)
                        for r, (w, s) in enumerate(zip(self.workers, shards))])
        kept = [o[:len(s)] for o, s in zip(outs, self._real_sizes(len(products)))]
        return [r for part in kept for r in part]

    def _real_sizes(self, total: int) -> list[list]:
        k, extra = divmod(total, self.n)
        return [range(k + (1 if r < extra else 0)) for r in range(self.n)]

    def train_step(self, examples: list[PreferenceExample]) -> dict:
        """One optimizer step on ``examples`` split across ranks; metrics averaged by example count."""
        if len(examples) < self.n:
            raise ValueError(f"a train step needs at least one example per rank ({self.n}), got {len(examples)}")
        shards = self._split(examples)
        n_micro = self._micro_batches_per_rank(shards)
        return pcpo_kind_means(self._weighted(self._gather([w.train_step.remote(s, n_micro)
                                                             for w, s in zip(self.workers, shards)])))

    def _micro_batches_per_rank(self, shards: list[list]) -> int:
        """Forwards every rank runs in a step: the largest shard's micro-batch count."""
        size = self.cfg.micro_batch_size or max(len(s) for s in shards)
        return max(-(-len(s) // size) for s in shards)

    def logps(self, examples: list[PreferenceExample]) -> list[float]:
        """Each example's chosen description's log-probability under the policy."""
        outs = self._gather([w.logps.remote(s) for w, s in zip(self.workers, self._split(examples))])
        return [x for o, r in zip(outs, self._real_sizes(len(examples))) for x in o[:len(r)]]

    def save(self, path: str | Path, uri: str | None = None) -> None:
        """Every rank writes its part of the checkpoint to ``path`` on its node; with object-store
        storage (``uri``) each node then uploads what it holds."""
        self._gather([w.save.remote(str(path)) for w in self.workers])
        if uri:
            self._gather([w.upload.remote(str(path), uri) for w in self._one_per_node()])

    def load(self, path: str | Path, uri: str | None = None) -> None:
        """Load a checkpoint; with ``uri`` each node first downloads it from storage (fresh pods hold nothing)."""
        if uri:
            self._gather([w.fetch.remote(str(path), uri) for w in self._one_per_node()])
        self._gather([w.load.remote(str(path)) for w in self.workers])

    def save_model(self, path: str | Path, uri: str | None = None) -> None:
        self._gather([w.save_model.remote(str(path)) for w in self.workers])
        if uri:
            self._gather([w.upload.remote(str(path), uri) for w in self._one_per_node()])

    def _one_per_node(self) -> list:
        """One worker per Ray node (ranks on one node share its disk: one download/upload each)."""
        first: dict[str, object] = {}
        for w, node in zip(self.workers, self.node_ids()):
            first.setdefault(node, w)
        return list(first.values())

    def node_ids(self) -> list[str]:
        """The Ray node each rank runs on."""
        return self._gather([w.node_id.remote() for w in self.workers])

    def shutdown(self) -> None:
        """Kill every rank and free the placement group (safe to call twice, and on a broken group)."""
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

    @staticmethod
    def _weighted(parts: list[dict]) -> dict:
        total = sum(p["n_examples"] for p in parts)
        keys = [k for k in parts[0] if k != "n_examples"]
        out = {k: sum(p[k] * p["n_examples"] for p in parts) / total for k in keys}
        out["n_examples"] = total
        return out
