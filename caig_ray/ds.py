"""DeepSpeed and the distributed bootstrap, in one place: the config every engine is built from,
the process-group backend and its start, the environment every worker process gets, ZeRO-3
consolidation and ZeRO-3 generation.

Every DeepSpeed engine of the project -- the policy (``actors/policy.py``), RM training
(``jobs/train_rm.py``) and PM pretraining (``jobs/pretrain_pm.py``, through TRL) -- gets its config
from ``deepspeed_config``, so bf16/fp16, clipping and the ZeRO stage follow one rule: the role's
``dtype`` (``resources.*.dtype``) decides the mixed-precision block, nothing else.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from caig_ray.config import OptimizerConfig

WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
"""Environment of every worker process the jobs start (Ray Train workers, policy ranks, Serve replicas):
no model hub at run time, no tokenizer thread pool and one OpenMP thread per process (the process
count, not the thread count, is what the placement sizes)."""


def backend(use_gpu: bool) -> str:
    """The torch.distributed backend of a role: NCCL on GPUs, gloo on CPU."""
    return "nccl" if use_gpu else "gloo"


def skip_shm_build(use_gpu: bool) -> None:
    """On CPU, DeepSpeed's shm comm op is not built: gloo does not use it and its JIT build on first
    init costs ~100 s on 2 cores (docs/development.md, known traps). Patched through importlib so the
    real module is changed. Call before DeepSpeed (or an HF trainer using it) starts the process group."""
    if not use_gpu:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def init_distributed(use_gpu: bool) -> None:
    """``deepspeed.init_distributed`` with the role's backend (the rank/world/master variables are set
    by Ray Train or by the policy group), the shm op skipped on CPU."""
    import deepspeed

    skip_shm_build(use_gpu)
    deepspeed.init_distributed(dist_backend=backend(use_gpu))


def consolidated_state(engine, zero_stage: int) -> dict:
    """Full weights of a DeepSpeed engine's module on rank 0; under ZeRO-3 the partitions are gathered,
    so every rank must call this."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def deepspeed_config(zero_stage: int, dtype: str, micro_batch_size: int = 1, grad_accum: int | str = 1,
                     gradient_clipping: float = 1.0, for_trl: bool = False) -> dict:
    """The DeepSpeed config of one engine. ``for_trl`` leaves the batch keys and the precision to
    the HF trainer ("auto"), which fills them from its own arguments."""
    cfg = {
        "zero_optimization": {"stage": zero_stage},
        "gradient_clipping": "auto" if for_trl else gradient_clipping,
        # a client torch optimizer (no JIT-built FusedAdam/CPUAdam; docs/development.md, known traps)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    if zero_stage == 3:
        # no parameter stays resident by size alone: small tiny-model layers would otherwise skip the
        # partitioning that a 7B's layers go through, and tests would not exercise the real path
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    if for_trl:
        cfg.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto",
                   bf16={"enabled": "auto"}, fp16={"enabled": "auto"})
    else:
        cfg.update(train_micro_batch_size_per_gpu=micro_batch_size, gradient_accumulation_steps=grad_accum,
                   bf16={"enabled": dtype == "bfloat16"}, fp16={"enabled": dtype == "float16"})
    return cfg


@contextlib.contextmanager
def gathered_for_generation(engine, zero_stage: int):
    """Yield the module to call ``generate`` on. Under ZeRO-3 the whole model is gathered once for
    the call and ZeRO's per-module fetch hooks are lifted (TRL's ``remove_hooks``/``add_hooks``), so
    decoding does not all-gather every layer for every token, ranks need not decode in lock-step,
    and a parameter used outside its module's forward (LLaVA-NeXT's ``image_newline``) is whole."""
    if zero_stage != 3:
        yield engine.module
        return
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        remove_hooks(engine)
        try:
            yield engine.module
        finally:
            add_hooks(engine)


def adamw_with_schedule(params, opt: OptimizerConfig, total_steps: int):
    """AdamW at ``opt.lr`` and its LR schedule (transformers' own schedulers), for one engine of any role
    that trains: ``cosine`` is CAIG's linear warmup over ``warmup_ratio`` of the steps, then cosine decay
    to 0; ``constant`` keeps the lr (after the same warmup, if any). DeepSpeed steps the schedule with
    every ``engine.step()``."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=opt.lr)
    total = max(1, int(total_steps))
    name = "cosine" if opt.lr_schedule == "cosine" else "constant_with_warmup"
    return optimizer, get_scheduler(name, optimizer, num_warmup_steps=int(opt.warmup_ratio * total),
                                    num_training_steps=total)
