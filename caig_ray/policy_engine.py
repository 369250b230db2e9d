"""The policy on one rank, without Ray: a DeepSpeed ZeRO engine around the prompt model, its frozen
reference, ZeRO-3 generation, micro-batched DPO+PCPO steps, checkpoints and the final model folder.

docs/models.md, memory per GPU is the memory budget this follows: micro-batches with gradient accumulation inside one
optimizer step, optional gradient checkpointing, selective log-softmax (``policy_ops.response_logps``),
the whole model gathered once per ``generate`` call under ZeRO-3, loading under ``zero.Init``
(``HfDeepSpeedConfig``) so no rank holds the whole model, and a reference that costs nothing with
LoRA (the adapter disabled) or a shard with ``policy.reference: zero3``.
"""

from __future__ import annotations

from pathlib import Path

from caig_ray.config import PolicyConfig, WorkerGroupPlacement
from caig_ray.rows import PreferenceExample, ProductPrompt


class PolicyEngine:
    """One rank's policy: the DeepSpeed engine around the PM (ZeRO from ``policy.zero_stage``), its
    frozen reference, and the step-level operations the online loop calls. Build it after
    ``deepspeed.init_distributed`` (``actors/policy.py`` does that inside a Ray actor; a benchmark
    or a test can do it in a plain process)."""

    def __init__(self, model_path: str, cfg: PolicyConfig, placement: WorkerGroupPlacement, rank: int = 0,
                 total_steps: int = 1):
        import deepspeed
        import torch

        from caig_ray.ds import adamw_with_schedule, deepspeed_config
        from caig_ray.models.policy import load_policy

        self.model_path, self.cfg, self.placement, self.rank = model_path, cfg, placement, rank
        pl = placement
        self.device = pl.device
        torch.manual_seed(0)
        ds_config = deepspeed_config(cfg.zero_stage, pl.dtype)
        lora = cfg.lora.enabled
        # the reference: none with LoRA (adapter disabled), a whole copy, or a ZeRO-3 inference engine
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # whatever an earlier ZeRO-3 engine in this process left set
        self.ref = None
        if not lora and cfg.reference == "replicated":
            self.ref, _ = load_policy(self.model_path, pl.dtype, self.device)
            self.ref.eval().requires_grad_(False)
        self._zero3_init = None
        if cfg.zero_stage == 3:
            # every from_pretrained below runs under deepspeed.zero.Init: each rank holds its shard
            # only, never the whole model (docs/models.md, memory per GPU); keep the object alive while engines live
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
        optimizer, scheduler = adamw_with_schedule(params, cfg, total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    def generate(self, products: list[ProductPrompt], n: int, temperature: float, seed: int) -> list[dict]:
        from caig_ray.ds import gathered_for_generation
        from caig_ray.policy_ops import as_image, generate_descriptions
        from caig_ray.prompts import pm_instruction

        self.engine.eval()
        if not products:  # PolicyGroup pads short shards: under ZeRO-3 every rank must run generate
            raise ValueError("PolicyWorker.generate got no products")
        images = [as_image(p.image, self.cfg.image_size) for p in products]
        ins = [pm_instruction(p.title, p.attributes, p.template) for p in products]
        size, out = self.cfg.generate_batch_size, []
        # ZeRO-3: the whole model gathered once for this call (docs/models.md, memory per GPU), ranks decode independently;
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

    def _backward_over_micro_batches(self, examples: list[PreferenceExample], n_micro: int | None) -> dict:
        """Loss and metrics over this rank's shard, ``policy.micro_batch_size`` examples per forward;
        each micro-batch weighted by its share, so they equal one forward over the whole shard, and the
        weighted losses backpropagated into one accumulation (DeepSpeed's manual boundary: the last
        micro-batch closes it). ``n_micro``: forwards every rank runs (ZeRO-3 gathers parameters in
        each one, so every rank needs the same count)."""
        from caig_ray.policy_ops import micro_batches, preference_loss_on_rows, preference_rows

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
        metrics["n_examples"] = len(examples)
        metrics["n_micro_batches"] = len(chunks)
        return metrics

    def train_step(self, examples: list[PreferenceExample], n_micro: int | None = None) -> dict:
        """One optimizer step over this rank's shard (micro-batched, see ``_backward_over_micro_batches``)."""
        self.engine.train()
        metrics = self._backward_over_micro_batches(examples, n_micro)
        self.engine.step()
        metrics["lr"] = float(self.scheduler.get_last_lr()[0]) if self.scheduler else self.cfg.lr
        return metrics

    def logps(self, examples: list[PreferenceExample]) -> list[float]:
        """Summed log-probability of each example's chosen description under the policy (no gradient)."""
        import torch

        from caig_ray.policy_ops import as_image, build_batch, response_logps

        self.engine.eval()
        batch = build_batch(self.processor, [as_image(e.image, self.cfg.image_size) for e in examples],
                            [e.instruction for e in examples], [e.chosen for e in examples])
        with torch.no_grad():
            return response_logps(self.engine, batch.to(self.device)).tolist()

    def _consolidated_state(self) -> dict:
        """Full weights on rank 0 (ZeRO-3 gathers the partitions: every rank must call this)."""
        from caig_ray.ds import consolidated_state

        return consolidated_state(self.engine, self.cfg.zero_stage)

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
        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        from caig_ray.models.policy import load_policy

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


