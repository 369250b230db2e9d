"""E-commerce pretraining of the prompt model: ``python -m caig_ray.jobs.pretrain_pm`` / ``caig-ray pretrain-pm``.

SFT on CAIG's three tasks (``caig_ray/sft_data.py``) with TRL's ``SFTTrainer`` inside a Ray Train
``TorchTrainer``, DeepSpeed ZeRO from config (gloo on CPU). Before and after, the PM writes
descriptions for held-out products; the job reports the share that contain at least one scene word
of the market's language (what the renderer understands).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from caig_ray.config import CaigConfig
from caig_ray.data import read_catalog, read_click_logs
from caig_ray.ds import backend, deepspeed_config, skip_shm_build
from caig_ray.pairs import split_products
from caig_ray.storage import Output, model_location, new_run_id, resolve_output
from caig_ray.world import WorldLayout
from caig_ray.jobs._entry import add_config_args, pick, run_job
from caig_ray.jobs._ray import fit_to_folder, init_ray


def _held_out(products, cfg: CaigConfig):
    pc = cfg.pretrain
    frac = min(0.5, pc.eval_products / max(1, len(products)))
    _, test = split_products([p.id for p in products], frac, pc.seed)
    return [p for p in products if p.id not in test], [p for p in products if p.id in test]


@dataclass(frozen=True)
class PretrainLoop:
    """What each ``pretrain-pm`` Ray Train worker is given: the config, the catalog and click logs the
    e-commerce tasks are drawn from, the PM folder it starts from, and rank 0's TensorBoard folder."""

    cfg: CaigConfig
    catalog: str
    click_logs: str
    policy: str
    tensorboard: str


def train_func(loop: PretrainLoop) -> None:

    import ray.train
    from datasets import Dataset
    from ray.train import Checkpoint
    from trl import SFTConfig, SFTTrainer

    from caig_ray.data import load_log_image
    from caig_ray.models.policy import load_policy
    from caig_ray.policy_ops import as_image
    from caig_ray.sft_data import pretraining_examples

    cfg = loop.cfg
    pc, placement = cfg.pretrain, cfg.resources.pretraining
    skip_shm_build(placement.use_gpu)
    products = read_catalog(loop.catalog)
    train_products, _ = _held_out(products, cfg)
    logs = read_click_logs(loop.click_logs, check_images=False)
    size = cfg.policy.image_size
    examples = pretraining_examples(
        train_products, logs, lambda r: as_image(load_log_image(logs, r, Path(loop.click_logs).parent), size),
        lambda p: as_image(p.image, size), pc.seed, n_templates=cfg.policy.instruction_templates)
    if pc.max_examples:
        examples = examples[: pc.max_examples]
    dataset = Dataset.from_list([{k: v for k, v in e.items() if k != "task"} for e in examples])
    model, processor = load_policy(loop.policy, placement.dtype)
    ds_config = deepspeed_config(pc.zero_stage, placement.dtype, for_trl=True)
    rank = ray.train.get_context().get_world_rank()
    os.environ["TENSORBOARD_LOGGING_DIR"] = loop.tensorboard  # transformers 5 has no logging_dir
    with tempfile.TemporaryDirectory() as work:
        args = SFTConfig(
            output_dir=work, per_device_train_batch_size=pc.batch_size, num_train_epochs=pc.epochs,
            learning_rate=pc.lr, lr_scheduler_type=pc.lr_schedule,
            warmup_steps=pc.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the steps
            bf16=placement.dtype == "bfloat16", fp16=placement.dtype == "float16", use_cpu=not placement.use_gpu,
            ddp_backend=backend(placement.use_gpu), deepspeed=ds_config if pc.zero_stage else None,
            report_to=["tensorboard"], logging_steps=5, save_strategy="no",
            max_length=None, seed=pc.seed, disable_tqdm=rank != 0, dataloader_num_workers=0,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
        result = trainer.train()
        out = Path(work) / "pm"
        trainer.save_model(str(out))  # gathers ZeRO-3 partitions; rank 0 writes
        metrics = {"train_loss": result.training_loss, "steps": result.global_step,
                   "n_examples": len(examples), "train_s": result.metrics.get("train_runtime")}
        if rank == 0:
            processor.save_pretrained(str(out))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(out)))
        else:
            ray.train.report(metrics)


def scene_word_share(model_path: str | Path, products, cfg: CaigConfig, seed: int = 0) -> dict:
    """Share of generated descriptions (2 per held-out product) with at least one scene word."""
    from caig_ray.market.language import scene_words_in
    from caig_ray.models.policy import load_policy
    from caig_ray.policy_ops import as_image, generate_descriptions
    from caig_ray.prompts import pm_instruction

    driver = cfg.resources.driver_models  # the before/after probe runs in the driver process
    model, processor = load_policy(model_path, driver.dtype, driver.device)
    model.eval()
    gen = generate_descriptions(model, processor, [as_image(p.image, cfg.policy.image_size) for p in products],
                                [pm_instruction(p.title, p.attributes) for p in products], 2,
                                cfg.policy.temperature, seed, cfg.policy.max_new_tokens, device=driver.device)
    texts = [d for g in gen for d in g["descriptions"]]
    return {"scene_word_share": sum(scene_words_in(t) > 0 for t in texts) / len(texts), "examples": texts[:6]}


def pretrain_pm(cfg: CaigConfig, world_dir: str | Path | None, out: str | Path | Output) -> dict:
    """Supervised e-commerce pretraining of the PM; the model lands in ``out`` (relative to ``cfg.storage``
    when set), Ray Train's checkpoints in ``<out>_ray`` and rank 0's TensorBoard in ``<out>_tensorboard``."""
    store = out if isinstance(out, Output) else resolve_output(cfg.storage, out)
    lay = WorldLayout(world_dir) if world_dir else None
    # --world's data wins over data.*; the world's tiny PM is the start only where policy.model_path is unset
    catalog = Path(pick("--world", lay and lay.catalog, "data.catalog", cfg.data.catalog)).resolve()
    click_logs = Path(pick("--world", lay and lay.click_logs, "data.click_logs", cfg.data.click_logs)).resolve()
    policy = model_location(pick("--world", None, "policy.model_path", cfg.policy.model_path, lay and lay.policy),
                            cfg.storage)
    run_id = new_run_id()
    from caig_ray.models.folders import check_model_folder

    check_model_folder(policy, "policy.model_path", kind="policy")
    products = read_catalog(catalog)
    read_click_logs(click_logs)  # refuse bad input before any worker starts
    _, held_out = _held_out(products, cfg)
    out = store.local
    pc, placement = cfg.pretrain, cfg.resources.pretraining
    before = scene_word_share(policy, held_out, cfg)
    init_ray(None if placement.use_gpu else max(2, placement.num_workers))
    result = fit_to_folder(
        train_func,
        PretrainLoop(cfg=cfg, catalog=str(catalog), click_logs=str(click_logs), policy=str(policy),
                     tensorboard=str(store.sibling("tensorboard").local / run_id)),
        run_name=f"pretrain_pm-{run_id}", placement=placement, max_failures=pc.max_failures, storage=store.sibling("ray"),
        out=out)
    store.sibling("tensorboard").upload()
    after = scene_word_share(out, held_out, cfg)
    summary = {**result, "model_path": str(out),
               "zero_stage": pc.zero_stage, "held_out_products": len(held_out),
               "scene_word_share_before": before["scene_word_share"],
               "scene_word_share_after": after["scene_word_share"],
               "examples_before": before["examples"], "examples_after": after["examples"]}
    (out / "pretrain_metrics.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caig-ray pretrain-pm", description=__doc__)
    add_config_args(p, overwrite=True)
    p.add_argument("--world", default=None, help="a make-world folder: its catalog and click logs (over data.catalog "
                                                "and data.click_logs), and its tiny PM where policy.model_path is unset")
    p.add_argument("--out", required=True, help="folder the pretrained PM is written to")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None)
    p.add_argument("--epochs", type=float, default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return run_job(args, lambda cfg, out: pretrain_pm(cfg, args.world, out), "pretrain",
                   {"zero_stage": args.zero_stage, "epochs": args.epochs})


if __name__ == "__main__":
    sys.exit(main())
