"""Scoring ad pairs with the reward model: the RM's input, P(left better), the debiased score.

The input is CAIG's: both ads resized to the same side and concatenated horizontally into one
composite; the question carries the product title and attributes; the prompt ends where the answer
would start (the generation prompt), so the last token carries the decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from caig_ray.imaging import side_by_side
from caig_ray.prompts import rm_question


@dataclass
class PairToScore:
    left: Image.Image
    right: Image.Image
    title: str
    attributes: dict | None = None


def rm_inputs(processor, pairs: list[PairToScore], size: int, template: int = 0, swap: bool = False) -> dict:
    """Processor outputs for a batch of pairs (``swap`` puts the right ad on the left)."""
    images, prompts = [], []
    for p in pairs:
        left, right = (p.right, p.left) if swap else (p.left, p.right)
        images.append(side_by_side(left, right, size))
        prompts.append(processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": rm_question(p.title, p.attributes, template)}]}],
            add_generation_prompt=True, tokenize=False,
        ))
    return processor(text=prompts, images=images, return_tensors="pt", padding=True)


class PairScorer:
    """A frozen, eval-mode RM that scores pairs in batches (the core of ``RewardScorer`` and Serve)."""

    def __init__(self, model, processor, size: int, batch_size: int = 16, device: str = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor, self.size, self.batch_size, self.device = processor, size, batch_size, device

    @torch.no_grad()
    def _forward(self, pairs: list[PairToScore], swap: bool) -> tuple[torch.Tensor, torch.Tensor]:
        probs, ctrs = [], []
        for i in range(0, len(pairs), self.batch_size):
            enc = rm_inputs(self.processor, pairs[i:i + self.batch_size], self.size, swap=swap).to(self.device)
            out = self.model(**enc)
            probs.append(torch.softmax(out.logits.float(), -1)[:, 0].cpu())
            ctrs.append(out.ctr.float().cpu())
        return torch.cat(probs), torch.cat(ctrs)

    def score(self, pairs: list[PairToScore], debias: bool = True) -> dict[str, list[float]]:
        """``p_left``: P(left gets more clicks); ``p_left_debiased``: the mean of P(left | L,R) and
        1 - P(left | R,L), which cancels a preference for a side; ``ctr_left/right``: point branch."""
        p, ctr = self._forward(pairs, swap=False)
        out = {"p_left": p.tolist(), "ctr_left": ctr[:, 0].tolist(), "ctr_right": ctr[:, 1].tolist()}
        if debias:
            p_swapped, _ = self._forward(pairs, swap=True)
            out["p_left_debiased"] = ((p + 1 - p_swapped) / 2).tolist()
        return out
