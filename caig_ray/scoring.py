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


def chat_prompt(processor, content: list[dict]) -> str:
    """The user turn + generation prompt for ``content`` (text and image items), with every text
    item kept where it stands relative to the images. Some checkpoints' chat templates render all
    images first (llava-hf's Vicuna template); for those the turn is written as one text item with
    the family's image token inline, which the processor expands the same way."""
    def render(items):
        return processor.apply_chat_template([{"role": "user", "content": items}], add_generation_prompt=True,
                                             tokenize=False)

    prompt = render(content)
    texts = [c["text"] for c in content if c["type"] == "text"]
    first_image = next((k for k, c in enumerate(content) if c["type"] == "image"), None)
    image_token = getattr(processor, "image_token", None)
    if first_image is None or not texts or not image_token:
        return prompt
    text_before = [c["text"] for c in content[:first_image] if c["type"] == "text"]
    in_order = not text_before or prompt.find(image_token) > prompt.find(text_before[0]) >= 0
    if in_order:
        return prompt
    inline = "".join(c["text"] if c["type"] == "text" else image_token for c in content)
    return render([{"type": "text", "text": inline}])


def rm_inputs(processor, pairs: list[PairToScore], size: int, template: int | list[int] = 0, swap: bool = False,
              layout: str = "composite") -> dict:
    """Processor outputs for a batch of pairs (``swap`` puts the right ad on the left; ``template``: the
    question template, one for all pairs or one per pair).

    ``layout="composite"`` is CAIG's: one image, the two ads side by side. ``"two_images"`` passes
    the ads as two images in one prompt ("Left ad: <image> Right ad: <image>"): with M-RoPE and no
    absolute position embedding, a tiny Qwen2-VL tells the halves of one composite apart only
    slowly, while two images sit at clearly different positions (see the README's RM section)."""
    images, prompts = [], []
    templates = template if isinstance(template, list) else [template] * len(pairs)
    for p, t in zip(pairs, templates):
        left, right = (p.right, p.left) if swap else (p.left, p.right)
        question = {"type": "text", "text": rm_question(p.title, p.attributes, t)}
        if layout == "composite":
            images.append(side_by_side(left, right, size))
            content = [{"type": "image"}, question]
        elif layout == "two_images":
            images += [left.convert("RGB").resize((size, size)), right.convert("RGB").resize((size, size))]
            content = [{"type": "text", "text": "Left ad:"}, {"type": "image"},
                       {"type": "text", "text": " Right ad:"}, {"type": "image"}, question]
        else:
            raise ValueError(f"unknown pair layout {layout!r}; use 'composite' or 'two_images'")
        prompts.append(chat_prompt(processor, content))
    return processor(text=prompts, images=images, return_tensors="pt", padding=True)


class PairScorer:
    """A frozen, eval-mode RM that scores pairs in batches (the core of ``RewardScorer`` and Serve)."""

    def __init__(self, model, processor, size: int | None = None, batch_size: int = 16, device: str = "cpu",
                 layout: str | None = None):
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor, self.batch_size, self.device = processor, batch_size, device
        # a trained RM records how it saw pairs; explicit arguments override
        self.size = size or getattr(model.config, "caig_pair_image_size", 56)
        self.layout = layout or getattr(model.config, "caig_pair_layout", "composite")

    @torch.no_grad()
    def _forward(self, pairs: list[PairToScore], swap: bool) -> tuple[torch.Tensor, torch.Tensor]:
        probs, ctrs = [], []
        for i in range(0, len(pairs), self.batch_size):
            enc = rm_inputs(self.processor, pairs[i:i + self.batch_size], self.size, swap=swap,
                            layout=self.layout).to(self.device)
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


def round_robin(n: int) -> list[tuple[int, int]]:
    """Every unordered pair (i, j), i < j, of ``n`` candidates: what one ranking scores."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def rank_round_robin(n: int, p_left_debiased: list[float], ctr_left: list[float],
                     ctr_right: list[float]) -> tuple[list[float], list[float], list[int]]:
    """Rank ``n`` candidates from their ``round_robin(n)`` pair scores (CAIG ranks by pairwise wins):
    ``win_rate[k]`` = mean debiased P(k beats each other candidate); ``ctr[k]`` = mean point-level CTR
    of k over its pairs; ``order`` = candidate indices best first (ties by index). Shared by
    ``generate`` and Serve's ``/v1/rank``. With one candidate: win rate 1, rank 0."""
    wins, ctr = [0.0] * n, [0.0] * n
    for (i, j), p, cl, cr in zip(round_robin(n), p_left_debiased, ctr_left, ctr_right):
        wins[i] += p
        wins[j] += 1 - p
        ctr[i] += cl
        ctr[j] += cr
    if n == 1:
        return [1.0], [float("nan")], [0]
    win_rate, mean_ctr = [w / (n - 1) for w in wins], [c / (n - 1) for c in ctr]
    return win_rate, mean_ctr, sorted(range(n), key=lambda k: -win_rate[k])
