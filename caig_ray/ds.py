"""DeepSpeed, in one place: the config every engine is built from, and ZeRO-3 generation.

Every DeepSpeed engine of the project -- the policy (``actors/policy.py``), RM training
(``jobs/train_rm.py``) and PM pretraining (``jobs/pretrain_pm.py``, through TRL) -- gets its config
from ``deepspeed_config``, so bf16/fp16, clipping and the ZeRO stage follow one rule: the role's
``dtype`` (``resources.*.dtype``) decides the mixed-precision block, nothing else.
"""

from __future__ import annotations

import contextlib


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


def lr_scheduler(optimizer, schedule: str, warmup_ratio: float, total_steps: int):
    """The LR schedule of one engine (transformers' own schedulers): ``cosine`` is CAIG's linear
    warmup over ``warmup_ratio`` of the steps, then cosine decay to 0; ``constant`` keeps the lr
    (after the same warmup, if any). DeepSpeed steps it with every ``engine.step()``."""
    from transformers import get_scheduler

    total = max(1, int(total_steps))
    name = "cosine" if schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=int(warmup_ratio * total), num_training_steps=total)
