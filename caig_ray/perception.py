"""Perception pretraining of the tiny vision tower: the embedded default's analogue of the pretrained
(CLIP-style) tower every real MLLM starts from.

On freshly rendered ads of the world -- a random catalog product behind a random description, no
clicks -- the tower and its projector (Qwen2-VL's patch merger) learn to recover what was rendered:
one linear head per attribute (scene, palette, lighting, clutter, and the product's category) on the
mean of the image's tokens, cross-entropy summed over the heads. The heads are thrown away; the tower
is written back into the tiny PM (and the tiny RM's starting folder). Real checkpoints skip this.

The report is a **linear probe of the frozen tower** on held-out renders (a logistic regression per
attribute on the pooled tokens, fitted on one half, scored on the other), before and after: what a
linear reader of the tower's output can tell apart (docs/models.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from caig_ray.market.language import ATTRIBUTES, CLUTTER_WORDS, LIGHTING_WORDS, PALETTE_WORDS, SCENE_WORDS, describe, Background

PROBED = ("scene", "palette", "lighting", "clutter", "category")
_VALUES = {"scene": ["plain", *SCENE_WORDS], "palette": list(PALETTE_WORDS), "lighting": list(LIGHTING_WORDS),
           "clutter": list(CLUTTER_WORDS)}


@dataclass
class Renders:
    """Rendered ads at the model's input size and their labels (attribute -> class index per ad)."""

    images: list[Image.Image]
    labels: dict[str, np.ndarray]


def render_set(products, categories: list[str], n: int, image_size: int, ad_size: int, product_fill: float,
               seed: int) -> Renders:
    """``n`` ads: each a random product of ``products`` behind a random background description
    (every attribute drawn uniformly, "plain" among the scenes), rendered by the market's renderer."""
    from caig_ray.market.render import ProceduralRenderer
    from caig_ray.policy_ops import as_image

    rng = np.random.default_rng([seed, 53])
    renderer = ProceduralRenderer(ad_size, product_fill)
    images, labels = [], {k: [] for k in PROBED}
    for k in range(n):
        product = products[int(rng.integers(len(products)))]
        bg = Background(**{attr: str(rng.choice(_VALUES[attr])) for attr in ATTRIBUTES})
        ad = renderer.render([product.image], [describe(bg, rng)], [int(rng.integers(0, 2**31 - 1))])[0]
        images.append(as_image(ad.image, image_size))
        for attr in ATTRIBUTES:
            labels[attr].append(_VALUES[attr].index(ad.latent[attr]))
        labels["category"].append(categories.index(product.category))
    return Renders(images, {k: np.asarray(v) for k, v in labels.items()})


def n_classes(categories: list[str]) -> dict[str, int]:
    return {**{k: len(v) for k, v in _VALUES.items()}, "category": len(categories)}


class PooledTower(torch.nn.Module):
    """The MLLM's vision tower + projector, one vector per image (the mean of its merged tokens)."""

    def __init__(self, visual: torch.nn.Module, image_processor):
        super().__init__()
        self.visual, self.image_processor = visual, image_processor

    def forward(self, images: list[Image.Image]) -> torch.Tensor:
        enc = self.image_processor(images=images, return_tensors="pt")
        out = self.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
        tokens = getattr(out, "pooler_output", None)
        if tokens is None:  # transformers versions differ in what the tower returns
            tokens = out if isinstance(out, torch.Tensor) else out[0]
        merge = getattr(self.image_processor, "merge_size", 2) ** 2
        counts = (enc["image_grid_thw"].prod(-1) // merge).tolist()
        return torch.stack([t.mean(0) for t in torch.split(tokens, counts)])


@torch.no_grad()
def features(tower: PooledTower, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
    tower.eval()
    return torch.cat([tower(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def linear_probe(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray,
                 n_class: int, steps: int = 300) -> float:
    """Held-out accuracy of a multinomial logistic regression (L2 1e-3, L-BFGS) on standardised features."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(a.shape[1], n_class)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    y = torch.as_tensor(train_y)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(a), y) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(b).argmax(-1).numpy() == test_y).mean())


def probe(tower: PooledTower, renders: Renders, classes: dict[str, int]) -> dict[str, float]:
    """Linear-probe accuracy per attribute: fitted on the first half of ``renders``, scored on the second."""
    x = features(tower, renders.images)
    h = len(renders.images) // 2
    return {k: linear_probe(x[:h], renders.labels[k][:h], x[h:], renders.labels[k][h:], classes[k]) for k in PROBED}


def pretrain_tower(policy_dir: str | Path, products, categories: list[str], cfg, market, image_size: int,
                   also: list[str | Path] = (), progress: bool = True) -> dict:
    """Train the tiny PM's tower in ``policy_dir`` on fresh renders (``cfg``: a ``PerceptionConfig``),
    write it back there and into each folder of ``also`` (same tower shape: the tiny RM's start), and
    return the probe's accuracies before and after, the majority-class rates and the time taken."""
    from tqdm.auto import tqdm

    from caig_ray.models.policy import load_policy

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model, processor = load_policy(policy_dir)
    tower = PooledTower(model.model.visual, processor.image_processor)
    classes = n_classes(categories)
    make = lambda n, seed: render_set(products, categories, n, image_size, market.ad_image_size,  # noqa: E731
                                      market.product_fill, seed)
    train, held_out = make(cfg.train_renders, cfg.seed), make(cfg.probe_renders, cfg.seed + 7777)
    before = probe(tower, held_out, classes)
    dim = features(tower, train.images[:2]).shape[1]
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, classes[k]) for k in PROBED})
    params = list(tower.visual.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng([cfg.seed, 59])
    n_steps = cfg.epochs * -(-len(train.images) // cfg.batch_size)
    losses = []
    bar = tqdm(total=n_steps, desc="perception pretraining", disable=not progress)
    for _ in range(cfg.epochs):
        order = rng.permutation(len(train.images))
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            tower.train()
            z = tower([train.images[j] for j in idx])
            loss = sum(torch.nn.functional.cross_entropy(heads[k](z), torch.as_tensor(train.labels[k][idx]))
                       for k in PROBED)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
    bar.close()
    after = probe(tower, held_out, classes)
    state = {k: v.detach().clone() for k, v in tower.visual.state_dict().items()}
    model.save_pretrained(policy_dir)
    for folder in also:
        _write_tower(folder, state)
    majority = {k: float(np.bincount(held_out.labels[k][len(held_out.images) // 2:]).max()
                         / (len(held_out.images) - len(held_out.images) // 2)) for k in PROBED}
    return {"probe_accuracy_before": before, "probe_accuracy": after, "probe_majority_rate": majority,
            "train_renders": len(train.images), "probe_renders": len(held_out.images), "steps": len(losses),
            "loss_first": losses[0] if losses else None, "loss_last": float(np.mean(losses[-10:])) if losses else None,
            "image_size": image_size, "wall_s": time.perf_counter() - t0}


def _write_tower(folder: str | Path, state: dict) -> None:
    """Put the pretrained tower into another tiny MLLM folder of the same vision shape (the RM's start)."""
    from caig_ray.models.reward import load_reward_model

    model, _ = load_reward_model(folder, from_backbone=True)
    visual = model.model.visual if hasattr(model.model, "visual") else model.visual
    visual.load_state_dict(state)
    model.save_pretrained(folder)
