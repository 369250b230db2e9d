"""``PolicyGroup`` / ``PolicyWorker``: the prompt model under DeepSpeed ZeRO in N Ray actors.

The OpenRLHF pattern: the actors sit in a placement group; rank 0 picks MASTER_ADDR/PORT; every
rank sets RANK/WORLD_SIZE/LOCAL_RANK, calls ``deepspeed.init_distributed`` and then
``deepspeed.initialize`` with the ZeRO stage from config. Each worker also holds a frozen
reference model (the pretrained PM, fixed for all rounds). The driver fans step-level calls out to
all ranks (every rank must take part in ZeRO collectives) and gathers the results.
"""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from caig_ray.config import PolicyConfig, WorkerGroupPlacement


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class PolicyWorker:
    def __init__(self, rank: int, world_size: int, model_path: str, cfg: dict, placement: dict,
                 total_steps: int = 1):
        self.rank, self.world_size, self.model_path = rank, world_size, model_path
        self.cfg = PolicyConfig.model_validate(cfg)
        self.placement = WorkerGroupPlacement.model_validate(placement)
        self.total_steps = total_steps

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def init_engine(self, master_addr: str, master_port: int) -> None:
        import deepspeed
        import torch

        from caig_ray.ds import deepspeed_config, lr_scheduler
        from caig_ray.models.policy import load_policy

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          # Ray gives each actor its own GPU as cuda:0 (CUDA_VISIBLE_DEVICES), so local rank 0
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        pl, cfg = self.placement, self.cfg
        if not pl.use_gpu:
            # gloo on CPU needs no shm comm op; its JIT build costs ~100 s (DESIGN.md §7)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="nccl" if pl.use_gpu else "gloo")
        self.device = pl.device
        torch.manual_seed(0)
        ds_config = deepspeed_config(cfg.zero_stage, pl.dtype)
        lora = cfg.lora.enabled
        # the reference: none with LoRA (adapter disabled), a whole copy, or a ZeRO-3 inference engine
        self.ref = None
        if not lora and cfg.reference == "replicated":
            self.ref, _ = load_policy(self.model_path, pl.dtype, self.device)
            self.ref.eval().requires_grad_(False)
        self._zero3_init = None
        if cfg.zero_stage == 3:
            # every from_pretrained below runs under deepspeed.zero.Init: each rank holds its shard
            # only, never the whole model (DESIGN.md 8.2); keep the object alive while engines live
            from transformers.integrations import HfDeepSpeedConfig

            self._zero3_init = HfDeepSpeedConfig(ds_config)
        model, self.processor = load_policy(self.model_path, pl.dtype, device=None)
        if not lora and cfg.reference == "zero3":
            ref, _ = load_policy(self.model_path, pl.dtype, device=None)
            self.ref, *_ = deepspeed.initialize(model=ref.eval().requires_grad_(False),
                                                config=deepspeed_config(3, pl.dtype))
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if lora:
            from peft import LoraConfig, get_peft_model

            lc = cfg.lora
            if cfg.gradient_checkpointing:
                model.enable_input_require_grads()
            # language-model projections only: vision tower, projector and lm_head stay frozen
            model = get_peft_model(model, LoraConfig(
                r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                target_modules=r".*language_model.*\.(" + "|".join(lc.target_modules) + ")$"))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr)
        scheduler = lr_scheduler(optimizer, cfg.lr_schedule, cfg.warmup_ratio, self.total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    def generate(self, products: list[dict], n: int, temperature: float, seed: int) -> list[dict]:
        from caig_ray.ds import gathered_for_generation
        from caig_ray.policy_ops import as_image, generate_descriptions
        from caig_ray.prompts import pm_instruction

        self.engine.eval()
        if not products:  # PolicyGroup pads short shards: under ZeRO-3 every rank must run generate
            raise ValueError("PolicyWorker.generate got no products")
        images = [as_image(p["image"], self.cfg.image_size) for p in products]
        ins = [pm_instruction(p["title"], p.get("attributes")) for p in products]
        size, out = self.cfg.generate_batch_size, []
        # ZeRO-3: the whole model gathered once for this call (DESIGN.md 8.2), ranks decode independently;
        # products in chunks of generate_batch_size so the KV cache fits
        with gathered_for_generation(self.engine, self.cfg.zero_stage) as module:
            if self.cfg.gradient_checkpointing:
                module.config.use_cache = True
            for k in range(0, len(products), size):
                out += generate_descriptions(module, self.processor, images[k:k + size], ins[k:k + size], n,
                                             temperature, seed + k, self.cfg.max_new_tokens, device=self.device)
            if self.cfg.gradient_checkpointing:
                module.config.use_cache = False
        return out

    def train_step(self, examples: list[dict], n_micro: int | None = None) -> dict:
        """One optimizer step over this rank's shard: ``policy.micro_batch_size`` examples per
        forward/backward, gradients accumulated (DeepSpeed's manual accumulation boundary) and each
        micro-batch's loss weighted by its share, so loss, metrics and update equal one forward over
        the whole shard. ``n_micro``: forwards every rank runs (ZeRO-3 needs the same count)."""
        from caig_ray.policy_ops import micro_batches, preference_loss_on_rows, preference_rows

        self.engine.train()
        rows = preference_rows(examples, self.cfg.image_size, self.cfg.pcpo_weight)
        chunks = micro_batches(rows, self.cfg.micro_batch_size, n_micro)
        metrics: dict[str, float] = {}
        for k, (chunk, weight) in enumerate(chunks):
            self.engine.set_gradient_accumulation_boundary(k == len(chunks) - 1)
            loss, part = preference_loss_on_rows(self.engine, self.ref, self.processor, chunk, self.cfg.beta,
                                                 self.cfg.pcpo_weight, self.device)
            self.engine.backward(loss * weight)
            for key, value in part.items():
                metrics[key] = metrics.get(key, 0.0) + weight * value
        self.engine.step()
        metrics["n_examples"] = len(examples)
        metrics["n_micro_batches"] = len(chunks)
        metrics["lr"] = float(self.scheduler.get_last_lr()[0]) if self.scheduler else self.cfg.lr
        return metrics

    def eval_loss(self, examples: list[dict], n_micro: int | None = None) -> dict:
        import torch

        from caig_ray.policy_ops import micro_batches, preference_loss_on_rows, preference_rows

        self.engine.eval()
        rows = preference_rows(examples, self.cfg.image_size, self.cfg.pcpo_weight)
        metrics: dict[str, float] = {}
        with torch.no_grad():
            for chunk, weight in micro_batches(rows, self.cfg.micro_batch_size, n_micro):
                _, part = preference_loss_on_rows(self.engine, self.ref, self.processor, chunk, self.cfg.beta,
                                                  self.cfg.pcpo_weight, self.device)
                for key, value in part.items():
                    metrics[key] = metrics.get(key, 0.0) + weight * value
        metrics["n_examples"] = len(examples)
        return metrics

    def logps(self, examples: list[dict]) -> list[float]:
        import torch

        from caig_ray.policy_ops import as_image, build_batch, response_logps

        self.engine.eval()
        batch = build_batch(self.processor, [as_image(e["image"], self.cfg.image_size) for e in examples],
                            [e["instruction"] for e in examples], [e["response"] for e in examples])
        with torch.no_grad():
            return response_logps(self.engine, batch.to(self.device)).tolist()

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.engine.module.named_parameters() if p.requires_grad]

    def _consolidated_state(self) -> dict:
        """Full weights on rank 0 (ZeRO-3 gathers the partitions: every rank must call this)."""
        if self.cfg.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.engine.module.state_dict()

    def save(self, path: str) -> None:
        """DeepSpeed checkpoint (model + optimizer, every rank) and, from rank 0, the consolidated
        weights (``hf/``, or the LoRA ``adapter/`` -- consolidated under ZeRO-3 too, never the empty
        partitions) so a checkpoint's policy loads by path."""
        self.engine.save_checkpoint(str(Path(path) / "deepspeed"))
        state = self._consolidated_state()
        if self.rank == 0:
            self._write_model(Path(path) / ("adapter" if self.cfg.lora.enabled else "hf"), state)

    def _write_model(self, folder: Path, state: dict) -> None:
        # a PeftModel keeps only its adapter's weights of the consolidated state
        self.engine.module.save_pretrained(str(folder), state_dict=state)
        if not self.cfg.lora.enabled:
            self.processor.save_pretrained(str(folder))

    def save_model(self, path: str) -> None:
        """The trained policy as a plain model folder at ``path`` (``save_pretrained`` + processor),
        loadable by ``--policy path`` like any checkpoint. A LoRA policy is saved as its adapter
        (``path/adapter``, consolidated) and merged into the base from disk on rank 0."""
        state = self._consolidated_state()
        if self.rank != 0:
            return
        if not self.cfg.lora.enabled:
            self._write_model(Path(path), state)
            return
        from peft import PeftModel

        from caig_ray.models.policy import load_policy

        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        adapter = Path(path) / "adapter"
        self._write_model(adapter, state)
        unset_hf_deepspeed_config()  # the base for merging is a whole CPU copy, not a ZeRO-3 partition
        try:
            base, _ = load_policy(self.model_path, self.placement.dtype)
            PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(path)
        finally:
            if self._zero3_init is not None:
                set_hf_deepspeed_config(self._zero3_init)
        self.processor.save_pretrained(path)

    def load(self, path: str) -> None:
        load_path, _ = self.engine.load_checkpoint(str(Path(path) / "deepspeed"))
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {Path(path) / 'deepspeed'}")


class PolicyGroup:
    """N ``PolicyWorker`` actors in a placement group; calls fan out to every rank."""

    def __init__(self, model_path: str | Path, cfg: PolicyConfig, placement: WorkerGroupPlacement,
                 total_steps: int = 1, ready_timeout_s: float = 120):
        self.cfg, self.n = cfg, placement.num_workers
        bundle = {"CPU": placement.num_cpus, **({"GPU": placement.num_gpus} if placement.use_gpu else {})}
        self.pg = placement_group([bundle] * self.n, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"PolicyGroup: {self.n} bundles of {bundle} could not be placed within {ready_timeout_s:.0f} s; "
                f"available now: {ray.available_resources()}") from None
        actor = ray.remote(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), max_restarts=0)(PolicyWorker)
        env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}}
        self.workers = [
            actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=r), runtime_env=env,
            ).remote(r, self.n, str(model_path), cfg.model_dump(mode="json"), placement.model_dump(mode="json"),
                     total_steps)
            for r in range(self.n)
        ]
        addr, port = ray.get(self.workers[0].address.remote())  # rank 0 picks MASTER_ADDR/PORT
        ray.get([w.init_engine.remote(addr, port) for w in self.workers])

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

    def generate(self, products: list[dict], n: int = 2, temperature: float = 1.0, seed: int = 0) -> list[dict]:
        shards = self._split(products)
        outs = ray.get([w.generate.remote(s, n, temperature, seed + 1000 * r)
                        for r, (w, s) in enumerate(zip(self.workers, shards))])
        kept = [o[:len(s)] for o, s in zip(outs, self._real_sizes(len(products)))]
        return [r for part in kept for r in part]

    def _real_sizes(self, total: int) -> list[list]:
        k, extra = divmod(total, self.n)
        return [range(k + (1 if r < extra else 0)) for r in range(self.n)]

    def train_step(self, examples: list[dict]) -> dict:
        """One optimizer step on ``examples`` split across ranks; metrics averaged by example count."""
        if len(examples) < self.n:
            raise ValueError(f"a train step needs at least one example per rank ({self.n}), got {len(examples)}")
        shards = self._split(examples)
        n_micro = self._micro_batches_per_rank(shards)
        return self._weighted(ray.get([w.train_step.remote(s, n_micro) for w, s in zip(self.workers, shards)]))

    def _micro_batches_per_rank(self, shards: list[list]) -> int:
        """Forwards every rank runs in a step: the largest shard's micro-batch count."""
        size = self.cfg.micro_batch_size or max(len(s) for s in shards)
        return max(-(-len(s) // size) for s in shards)

    def eval_loss(self, examples: list[dict]) -> dict:
        if len(examples) < self.n:
            raise ValueError(f"eval needs at least one example per rank ({self.n}), got {len(examples)}")
        shards = self._split(examples)
        n_micro = self._micro_batches_per_rank(shards)
        return self._weighted(ray.get([w.eval_loss.remote(s, n_micro) for w, s in zip(self.workers, shards)]))

    def logps(self, examples: list[dict]) -> list[float]:
        outs = ray.get([w.logps.remote(s) for w, s in zip(self.workers, self._split(examples))])
        return [x for o, r in zip(outs, self._real_sizes(len(examples))) for x in o[:len(r)]]

    def save(self, path: str | Path) -> None:
        ray.get([w.save.remote(str(path)) for w in self.workers])

    def load(self, path: str | Path) -> None:
        ray.get([w.load.remote(str(path)) for w in self.workers])

    def save_model(self, path: str | Path) -> None:
        ray.get([w.save_model.remote(str(path)) for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)

    @staticmethod
    def _weighted(parts: list[dict]) -> dict:
        total = sum(p["n_examples"] for p in parts)
        keys = [k for k in parts[0] if k != "n_examples"]
        out = {k: sum(p[k] * p["n_examples"] for p in parts) / total for k in keys}
        out["n_examples"] = total
        return out
