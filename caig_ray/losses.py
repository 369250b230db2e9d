"""Losses. RM: CE on the 2-way decision + λ·MSE on the point-level CTR pair (CAIG: λ = 0.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rm_loss(logits: torch.Tensor, ctr_pred: torch.Tensor, labels: torch.Tensor, ctr_target: torch.Tensor,
            ctr_weight: float = 0.5, ctr_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Reward-model loss and its logged parts.

    - ``rm/ce``: mean_i -log softmax(logits_i)[label_i]       (label 0 = left gets more clicks)
    - ``rm/mse``: mean_ij (ctr_pred_ij - ctr_scale * ctr_target_ij)^2
    - ``rm/loss``: rm/ce + ctr_weight * rm/mse
    - ``rm/accuracy``: mean_i [argmax(logits_i) == label_i], ties (logit0 == logit1) count as left
    Raw CTRs (~1e-2) make the MSE term tiny; ``ctr_scale`` (e.g. 100: CTR in percent) is the
    scaled target."""
    ce = F.cross_entropy(logits.float(), labels)
    mse = F.mse_loss(ctr_pred.float(), ctr_scale * ctr_target.float())
    loss = ce + ctr_weight * mse
    pred = (logits[:, 1] > logits[:, 0]).long()
    return loss, {"rm/loss": loss.item(), "rm/ce": ce.item(), "rm/mse": mse.item(),
                  "rm/accuracy": (pred == labels).float().mean().item()}
