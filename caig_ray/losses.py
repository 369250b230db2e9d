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


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log π(token) over response tokens: logits[:, t] predicts input_ids[:, t+1]; prompt and
    padding positions (response_mask 0) are left out (CAIG and TRL sum, not average)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = torch.gather(logp, 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (tok * response_mask[:, 1:].to(tok.dtype)).sum(dim=1)


def preference_loss(pi_pos: torch.Tensor, pi_neg: torch.Tensor, ref_pos: torch.Tensor, ref_neg: torch.Tensor,
                    beta: float, prefix: str = "") -> tuple[torch.Tensor, dict[str, float]]:
    """Sigmoid DPO, TRL's formula and metric names (``prefix`` namespaces them, e.g. "pcpo/").

    - loss: mean -log σ(β·[(logπ(y+) - logπ_ref(y+)) - (logπ(y-) - logπ_ref(y-))])
    - ``rewards/chosen``: mean β·(logπ(y+) - logπ_ref(y+))
    - ``rewards/rejected``: mean β·(logπ(y-) - logπ_ref(y-))
    - ``rewards/accuracies``: mean [rewards_chosen > rewards_rejected] (strict)
    - ``rewards/margins``: mean (rewards_chosen - rewards_rejected)
    - ``logps/chosen``, ``logps/rejected``: mean summed log-probs of y+ / y- under π
    """
    chosen_rewards = beta * (pi_pos - ref_pos)
    rejected_rewards = beta * (pi_neg - ref_neg)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    return loss, {
        f"{prefix}loss": loss.item(),
        f"{prefix}rewards/chosen": cr.mean().item(),
        f"{prefix}rewards/rejected": rr.mean().item(),
        f"{prefix}rewards/accuracies": (cr > rr).float().mean().item(),
        f"{prefix}rewards/margins": (cr - rr).mean().item(),
        f"{prefix}logps/chosen": pi_pos.detach().mean().item(),
        f"{prefix}logps/rejected": pi_neg.detach().mean().item(),
    }


def dpo_pcpo_loss(dpo: tuple[torch.Tensor, ...], pcpo: tuple[torch.Tensor, ...] | None, beta: float,
                  pcpo_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Total = DPO + w·PCPO. Each argument is (logπ(y+), logπ(neg), logπ_ref(y+), logπ_ref(neg));
    for PCPO the negative is the product-centric one (masked image or another product's caption)
    with the same chosen description. ``loss`` = the total."""
    loss, metrics = preference_loss(*dpo, beta=beta)
    metrics["dpo/loss"] = metrics.pop("loss")
    if pcpo is not None and pcpo_weight > 0:
        pcpo_term, pcpo_metrics = preference_loss(*pcpo, beta=beta, prefix="pcpo/")
        loss = loss + pcpo_weight * pcpo_term
        metrics.update(pcpo_metrics)
    metrics["loss"] = loss.item()
    return loss, metrics


PCPO_KINDS = ("masked_image", "other_caption")


def pcpo_kind_parts(pcpo: tuple[torch.Tensor, ...], kinds: list[str], beta: float) -> dict[str, float]:
    """The PCPO term split by negative kind, as *parts*: linear in the rows, so micro-batches and ranks
    average them by example count like every other metric; ``pcpo_kind_means`` turns them into means.

    - ``pcpo/<kind>_share``: share of rows whose negative is of that kind
    - ``pcpo/<kind>/loss_part``: sum over those rows of -log σ(β·margin) / rows
    - ``pcpo/<kind>/correct_part``: sum over those rows of [margin > 0] / rows"""
    pi_pos, pi_neg, ref_pos, ref_neg = (t.detach().float() for t in pcpo)
    margin = beta * ((pi_pos - ref_pos) - (pi_neg - ref_neg))
    n, out = len(kinds), {}
    for kind in PCPO_KINDS:
        mine = torch.tensor([k == kind for k in kinds])
        out[f"pcpo/{kind}_share"] = float(mine.float().mean())
        out[f"pcpo/{kind}/loss_part"] = float(-F.logsigmoid(margin[mine]).sum()) / n
        out[f"pcpo/{kind}/correct_part"] = float((margin[mine] > 0).float().sum()) / n
    return out


def pcpo_kind_means(metrics: dict[str, float]) -> dict[str, float]:
    """Per negative kind, from ``pcpo_kind_parts`` averaged over a step's rows:

    - ``pcpo/<kind>/loss``: mean over the step's rows with that kind of -log σ(β·margin)
    - ``pcpo/<kind>/accuracy``: mean over those rows of [margin > 0], margin = β·[(logπ(y+|x) -
      logπ_ref(y+|x)) - (logπ(y+|x_neg) - logπ_ref(y+|x_neg))]
    (absent when the step had no row of that kind). Other metrics pass through."""
    out = {k: v for k, v in metrics.items() if not k.endswith("_part")}
    for kind in PCPO_KINDS:
        share = metrics.get(f"pcpo/{kind}_share", 0.0)
        if share > 0:
            out[f"pcpo/{kind}/loss"] = metrics[f"pcpo/{kind}/loss_part"] / share
            out[f"pcpo/{kind}/accuracy"] = metrics[f"pcpo/{kind}/correct_part"] / share
    return out
