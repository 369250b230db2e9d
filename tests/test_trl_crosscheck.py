"""Our DPO loss and metrics equal TRL's DPOTrainer's on the same tiny VLM and batch (to 1e-5)."""

import pytest
import torch


@pytest.mark.timeout(300)
def test_dpo_loss_and_metrics_match_trl(quick_world, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from caig_ray.data import read_catalog
    from caig_ray.losses import preference_loss, sequence_logps
    from caig_ray.models.policy import load_policy
    from caig_ray.policy_ops import as_image

    torch.manual_seed(0)
    products = read_catalog(quick_world.catalog)[:3]
    model, processor = load_policy(quick_world.policy)
    ref, _ = load_policy(quick_world.policy)
    with torch.no_grad():  # move the policy off the reference so rewards are not all zero
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    rows = [{
        "images": [as_image(p.image, 56)],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Background for {p.title}"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"a bright stadium, vivid {i}"}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "dim kitchen busy" + " x" * i}]}],
    } for i, p in enumerate(products)]
    args = DPOConfig(output_dir=str(tmp_path), beta=0.5, bf16=False, per_device_train_batch_size=3, report_to=[],
                     use_cpu=True, max_length=None)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=processor)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    trl_loss = trainer.compute_loss(trainer.model, batch).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        lp = sequence_logps(model(**inputs).logits, batch["input_ids"], batch["completion_mask"])
        ref_lp = sequence_logps(ref(**inputs).logits, batch["input_ids"], batch["completion_mask"])
    n = len(rows)
    loss, metrics = preference_loss(lp[:n], lp[n:], ref_lp[:n], ref_lp[n:], beta=0.5)
    assert loss.item() == pytest.approx(trl_loss, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=1e-5), key
    for key in ("logps/chosen", "logps/rejected"):
        assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-5), key
    assert abs(metrics["rewards/margins"]) > 1e-4  # a non-trivial case
