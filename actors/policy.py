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

        from caig_ray.models.policy import load_policy

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          # Ray gives each actor its own GPU as cuda:0 (CUDA_VISIBLE_DEVICES), so local rank 0
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        from caig_ray.ds import deepspeed_config, lr_scheduler

        pl = self.placement
        if not pl.use_gpu:
            # gloo on CPU needs no shm comm op; its JIT build costs ~100 s (DESIGN.md §7)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="nccl" if pl.use_gpu else "gloo")
        self.device = pl.device
        torch.manual_seed(0)
        model, self.processor = load_policy(self.model_path, pl.dtype)
        self.ref, _ = load_policy(self.model_path, pl.dtype, self.device)
        self.ref.eval().requires_grad_(False)
        if self.cfg.lora.enabled:
            from peft import LoraConfig, get_peft_model

            lc = self.cfg.lora
            # language-model projections only: vision tower, projector and lm_head stay frozen
            model = get_peft_model(model, LoraConfig(
                r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                target_modules=r".*language_model.*\.(" + "|".join(lc.target_modules) + ")$"))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr)
        scheduler = lr_scheduler(optimizer, self.cfg.lr_schedule, self.cfg.warmup_ratio, self.total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(self.cfg.zero_stage, pl.dtype))

    def generate(self, products: list[dict], n: int, temperature: float, seed: int) -> list[dict]:
        from caig_ray.ds import gathered_for_generation
        from caig_ray.policy_ops import as_image, generate_descriptions
        from caig_ray.prompts import pm_instruction

        self.engine.eval()
        if not products:  # PolicyGroup pads short shards: under ZeRO-3 every rank must run generate
            raise ValueError("PolicyWorker.generate got no products")
        images = [as_image(p["image"], self.cfg.image_size) for p in products]
        ins = [pm_instruction(p["title"], p.get("attributes")) for p in products]
        # ZeRO-3: the whole model gathered once for this call (DESIGN.md 8.2), ranks decode independently
        with gathered_for_generation(self.engine, self.cfg.zero_stage) as module:
            return generate_descriptions(module, self.processor, images, ins, n, temperature, seed,
                                         self.cfg.max_new_tokens, device=self.device)

    def train_step(self, examples: list[dict]) -> dict:
        from caig_ray.policy_ops import dpo_pcpo_step_loss

        self.engine.train()
        loss, metrics = dpo_pcpo_step_loss(self.engine, self.ref, self.processor, examples, self.cfg.beta,
                                           self.cfg.pcpo_weight, self.cfg.image_size, self.device)
        self.engine.backward(loss)
        self.engine.step()
        metrics["n_examples"] = len(examples)
        metrics["lr"] = float(self.scheduler.get_last_lr()[0]) if self.scheduler else self.cfg.lr
        return metrics

    def eval_loss(self, examples: list[dict]) -> dict:
        import torch

        from caig_ray.policy_ops import dpo_pcpo_step_loss

        self.engine.eval()
        with torch.no_grad():
            _, metrics = dpo_pcpo_step_loss(self.engine, self.ref, self.processor, examples, self.cfg.beta,
                                            self.cfg.pcpo_weight, self.cfg.image_size, self.device)
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

    def save(self, path: str) -> None:
        """DeepSpeed checkpoint (model + optimizer, every rank) and, from rank 0, the consolidated
        weights with ``save_pretrained`` (+ processor) so the PM loads by path like any model."""
        self.engine.save_checkpoint(str(Path(path) / "deepspeed"))
        state = (self.engine._zero3_consolidated_16bit_state_dict() if self.cfg.zero_stage == 3
                 else self.engine.module.state_dict())
        if self.rank == 0:
            module = self.engine.module
            if self.cfg.lora.enabled:
                module.save_pretrained(str(Path(path) / "adapter"))
            else:
                module.save_pretrained(str(Path(path) / "hf"), state_dict=state)
                self.processor.save_pretrained(str(Path(path) / "hf"))

    def save_model(self, path: str) -> None:
        """The trained policy as a plain model folder at ``path`` (``save_pretrained`` + processor),
        loadable by ``--policy path`` like any checkpoint. LoRA runs are saved merged into the base."""
        import copy

        if self.cfg.lora.enabled and self.cfg.zero_stage == 3:
            raise NotImplementedError("saving a merged LoRA policy under ZeRO-3 is not supported yet; "
                                      "use zero_stage 2 with LoRA")
        state = (self.engine._zero3_consolidated_16bit_state_dict() if self.cfg.zero_stage == 3
                 else self.engine.module.state_dict())
        if self.rank != 0:
            return
        module = self.engine.module
        if self.cfg.lora.enabled:
            copy.deepcopy(module).merge_and_unload().save_pretrained(path)
        else:
            module.save_pretrained(path, state_dict=state)
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
        return self._weighted(ray.get([w.train_step.remote(s) for w, s in zip(self.workers, self._split(examples))]))

    def eval_loss(self, examples: list[dict]) -> dict:
        if len(examples) < self.n:
            raise ValueError(f"eval needs at least one example per rank ({self.n}), got {len(examples)}")
        return self._weighted(ray.get([w.eval_loss.remote(s) for w, s in zip(self.workers, self._split(examples))]))

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
