"""Train the reward model on click-log pairs: ``python -m caig_ray.jobs.train_rm`` / ``caig-ray train-rm``.

Ray Train ``TorchTrainer`` with DeepSpeed ZeRO (stage from config) inside ``train_func``: gloo on
CPU, NCCL on GPU. The driver mines the pairs (rows and CTRs: small records) from the click log read
without its images; a Ray Dataset adds each pair's two ads, read by row number from the log, and Ray
Train hands each worker an equal shard (``get_dataset_shard``), streamed and locally shuffled each
epoch -- no worker reads the log whole. Each epoch the consolidated weights are saved with ``save_pretrained`` and reported as
a Ray Train checkpoint. The final model is copied to ``--out`` so ``RewardScorer`` and the Serve
endpoint load it by path.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from caig_ray.config import CaigConfig
from caig_ray.data import DataError, read_click_logs
from caig_ray.data.clicklogs import pair_images
from caig_ray.ds import adamw_with_schedule, consolidated_state, deepspeed_config, init_distributed
from caig_ray.pairs import mine_rm_pairs, redraw_pair
from caig_ray.prompts import template_index
from caig_ray.storage import Output, model_location, new_run_id, resolve_output
from caig_ray.world import WorldLayout
from caig_ray.jobs._entry import add_config_args, pick, run_job
from caig_ray.jobs._ray import fit_to_folder, init_ray


PAIR_FIELDS = ("left_row", "right_row", "left_creative", "right_creative", "ctr_left", "ctr_right", "label")


@dataclass(frozen=True)
class RmLoop:
    """What each ``train-rm`` Ray Train worker is given: the config, where the click logs and the
    backbone are, rank 0's TensorBoard folder, the pairs each rank takes, and the fixed probe pairs
    P(left) is reported on (a reloaded RM must give the same)."""

    cfg: CaigConfig
    click_logs: str
    backbone: str
    tensorboard: str
    pairs_per_rank: int
    probe: list[dict]


def train_func(loop: RmLoop) -> None:
    import deepspeed
    import ray.train
    import torch
    from ray.train import Checkpoint
    from tqdm.auto import tqdm

    import pyarrow as pa

    from caig_ray.data.catalog import decode_image
    from caig_ray.losses import rm_loss
    from caig_ray.models.reward import load_reward_model
    from caig_ray.scoring import PairToScore, rm_inputs

    cfg = loop.cfg
    tc, placement = cfg.train_rm, cfg.resources.reward_training
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    init_distributed(placement.use_gpu)
    device = f"cuda:{ctx.get_local_rank()}" if placement.use_gpu else "cpu"
    torch.manual_seed(tc.seed)

    # this rank's pairs, with their two ads, streamed by Ray Data (the log is never read whole here);
    # Ray Train splits the dataset into equal shards: equal step counts on every rank, or gloo hangs
    shard = ray.train.get_dataset_shard("train")
    per_rank, log_path = loop.pairs_per_rank, loop.click_logs
    base = Path(log_path).parent

    def image(pair: dict, side: str):
        return decode_image(pair[f"{side}_image"], base, f"{log_path}, row {pair[f'{side}_row']}, field 'image'"
                            ).convert("RGB")

    model, processor = load_reward_model(loop.backbone, from_backbone=True, dtype=placement.dtype)
    model.train()
    steps_per_epoch = max(1, per_rank // tc.batch_size)
    optimizer, scheduler = adamw_with_schedule(list(model.parameters()), tc, tc.epochs * steps_per_epoch)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(tc.zero_stage, placement.dtype, tc.batch_size))

    writer = None
    if rank == 0 and loop.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(loop.tensorboard)
    step, t0 = 0, time.perf_counter()
    for epoch in range(tc.epochs):
        sums: dict[str, float] = {}
        epoch_steps = 0
        batches = shard.iter_batches(batch_size=tc.batch_size, batch_format="pyarrow",
                                     drop_last=per_rank >= tc.batch_size,  # then every rank takes the same steps
                                     local_shuffle_buffer_size=min(per_rank, 1024),
                                     local_shuffle_seed=tc.seed + 7919 * epoch + rank)
        for table in tqdm(batches, desc=f"rm epoch {epoch}", disable=rank != 0, total=steps_per_epoch):
            # left/right drawn again every epoch; CAIG's question variety: one template per pair and epoch
            batch = [redraw_pair(p, tc.seed, epoch) for p in table.to_pylist()]
            questions = [template_index(tc.seed, f"{p['left_row']}-{p['right_row']}", cfg.reward.question_templates,
                                        epoch) for p in batch]
            enc = rm_inputs(processor, [PairToScore(image(p, "left"), image(p, "right"), p["title"] or "")
                                        for p in batch],
                            cfg.reward.pair_image_size, template=questions, layout=cfg.reward.pair_layout).to(device)
            labels = torch.tensor([p["label"] for p in batch], device=device)
            ctr_t = torch.tensor([[p["ctr_left"], p["ctr_right"]] for p in batch], device=device)
            out = engine(**enc)
            loss, metrics = rm_loss(out.logits, out.ctr, labels, ctr_t, cfg.reward.ctr_loss_weight,
                                    tc.ctr_target_scale)
            engine.backward(loss)
            engine.step()
            step += 1
            epoch_steps += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            if writer:
                for k, v in metrics.items():
                    writer.add_scalar(k, v, step)
        metrics = {k: v / max(1, epoch_steps) for k, v in sums.items()}
        metrics.update(epoch=epoch, step=step, train_s=time.perf_counter() - t0, pairs_per_rank=per_rank)
        if epoch == tc.epochs - 1:
            # P(left) of the trained engine on fixed probe pairs: a reloaded checkpoint must match it
            engine.eval()
            probe = pair_images(pa.Table.from_pylist(loop.probe), log_path).to_pylist()
            with torch.no_grad():
                enc = rm_inputs(processor, [PairToScore(image(p, "left"), image(p, "right"), p["title"] or "")
                                            for p in probe],
                                cfg.reward.pair_image_size, layout=cfg.reward.pair_layout).to(device)
                metrics["probe_p_left"] = torch.softmax(engine(**enc).logits.float(), -1)[:, 0].tolist()
            metrics["probe_rows"] = [[p["left_row"], p["right_row"]] for p in probe]
        # every rank takes part in consolidation (ZeRO-3 gathers the partitions)
        state = consolidated_state(engine, tc.zero_stage)
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                engine.module.config.caig_pair_layout = cfg.reward.pair_layout
                engine.module.config.caig_pair_image_size = cfg.reward.pair_image_size
                engine.module.save_pretrained(d, state_dict=state)
                processor.save_pretrained(d)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
    if writer:
        writer.close()


def train_rm(cfg: CaigConfig, world_dir: str | Path | None, out: str | Path | Output) -> dict:
    """Run the TorchTrainer; the final RM lands in ``out`` (``save_pretrained`` layout; relative to
    ``cfg.storage`` when set), Ray Train's checkpoints in ``<out>_ray`` and rank 0's TensorBoard in
    ``<out>_tensorboard`` beside it."""
    store = out if isinstance(out, Output) else resolve_output(cfg.storage, out)
    lay = WorldLayout(world_dir) if world_dir else None
    # --world's logs win over data.click_logs; the world's tiny RM is the backbone only where the config names none
    click_logs = Path(pick("--world", lay and lay.click_logs, "data.click_logs", cfg.data.click_logs)).resolve()
    backbone = model_location(pick("--init-from", None, "reward.backbone_path", cfg.reward.backbone_path,
                                   lay and lay.reward), cfg.storage)
    run_id = new_run_id()
    # bad logs are refused before any training worker starts: counts checked here (the image column is
    # not read into the driver), every ad image decoded on the cluster by Ray Data
    logs = read_click_logs(click_logs, check_images=False, with_images=False)
    out = store.local
    tc, placement = cfg.train_rm, cfg.resources.reward_training
    band = tuple(tc.train_band or cfg.market.band)
    # the pairs are small records (rows, CTRs, label): mined here, their images read by the workers
    pairs = [{k: p[k] for k in PAIR_FIELDS}
             for p in mine_rm_pairs(logs, cfg.market.min_impressions, band, tc.test_fraction, tc.seed)
             if p["split"] == "train"][: tc.max_pairs or None]
    n_train = len(pairs)
    if n_train < placement.num_workers:  # else Ray Train starts, fails, retries
        raise DataError(f"{click_logs}: {n_train} training pair(s) for {placement.num_workers} worker(s): a pair is two "
                        f"creatives of one product, each with > {cfg.market.min_impressions} impressions, whose CTR "
                        f"ratio lies in {list(band)} (train_rm.train_band / market.band)")
    from caig_ray.models.folders import check_model_folder

    check_model_folder(backbone, "reward.backbone_path", kind="backbone")
    init_ray(None if placement.use_gpu else max(2, placement.num_workers))
    from caig_ray.dataplane.catalog import check_click_log_images

    check_click_log_images(click_logs)
    import ray.data

    # the map only reads rows of the log: no CPU reserved (the trainers may hold every CPU), and so at most
    # two tasks at a time (with no CPU to count, Ray Data would start one per block at once)
    dataset = ray.data.from_items(pairs, override_num_blocks=max(1, min(64, n_train // 512))).map_batches(
        pair_images, batch_format="pyarrow", num_cpus=0, concurrency=2, fn_kwargs={"path": str(click_logs)})
    summary = fit_to_folder(
        train_func,
        RmLoop(cfg=cfg, click_logs=str(click_logs), backbone=str(backbone),
               tensorboard=str(store.sibling("tensorboard").local / run_id),
               pairs_per_rank=n_train // placement.num_workers, probe=pairs[:4]),
        run_name=f"train_rm-{run_id}", placement=placement, max_failures=tc.max_failures, storage=store.sibling("ray"), out=out,
        datasets={"train": dataset})
    store.sibling("tensorboard").upload()
    summary.update(model_path=str(out), zero_stage=tc.zero_stage, num_workers=placement.num_workers)
    (out / "train_metrics.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caig-ray train-rm", description=__doc__)
    add_config_args(p, overwrite=True)
    p.add_argument("--world", default=None, help="a make-world folder: its click logs (over data.click_logs), and its "
                                                "tiny RM as the backbone where the config names none")
    p.add_argument("--out", required=True, help="folder the trained RM is written to")
    p.add_argument("--init-from", default=None, metavar="PM_FOLDER",
                   help="start the RM from this model folder (CAIG: the e-commerce-pretrained PM, pretrain-pm --out); "
                        "sets reward.backbone_path")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return run_job(args, lambda cfg, out: train_rm(_init_from(cfg, args.init_from), args.world, out), "train_rm",
                   {"zero_stage": args.zero_stage, "epochs": args.epochs, "max_pairs": args.max_pairs, "lr": args.lr})


def _init_from(cfg: CaigConfig, folder: str | None) -> CaigConfig:
    """``--init-from PM_FOLDER``: the RM's backbone is that folder (reward.backbone_path)."""
    if folder is None:
        return cfg
    return cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"backbone_path": model_location(folder, cfg.storage)})})


if __name__ == "__main__":
    sys.exit(main())
