"""Sample with the policy a block at a time and feed each block into the pipeline as soon as it is
sampled; take scored blocks back by segment."""

from __future__ import annotations

import dataclasses
import time

from caig_ray.config import CaigConfig
from caig_ray.loop.plan import RoundPlan
from caig_ray.loop.protocols import Pipeline, Policy
from caig_ray.online import RunState, candidate_pairs, pm_template
from caig_ray.rows import CandidatePair, ProductPrompt, ScoredPair


class Feed:
    """Feed and stream: samples with the policy group a block at a time and puts each block into the
    pipeline as soon as it is sampled (renderers start on a round's first block while the policy
    samples the next, docs/online-loop.md, the driver is the control plane); takes scored blocks back by segment (kind, round). One per
    pipeline: a recovery builds a new one."""

    def __init__(self, cfg: CaigConfig, group: Policy, stream: Pipeline):
        self.cfg, self.oc, self.group, self.stream = cfg, cfg.online, group, stream
        self.fed_rounds: set[int] = set()
        self.buffer: dict[tuple, list[ScoredPair]] = {}
        self.gen_s: dict[int, float] = {}  # round -> seconds its sampling took

    def put(self, rows: list[CandidatePair], products: dict) -> None:
        """Rows in blocks of ``pairs_per_batch``, each saying where its product image is (never the image)."""
        for k in range(0, len(rows), self.oc.pairs_per_batch):
            chunk = rows[k:k + self.oc.pairs_per_batch]
            self.stream.put([dataclasses.replace(r, image_ref=products[r.product_id].image_ref) for r in chunk])

    def sample_round(self, r: int, plan: RoundPlan, state: RunState) -> None:
        """Sample round ``r`` with the current weights (or take the samples a checkpoint kept) and feed it."""
        key = str(r)
        if key in state.pending:  # sampled before a checkpoint: fed as kept
            self.put(state.pending[key], plan.products)
        else:
            prods = plan.round_products(r)
            k = self.cfg.policy.instruction_templates  # each product's instruction for this round (CAIG's variety)
            block, pairs, t = self.oc.pairs_per_batch, [], time.perf_counter()
            for c in range(0, len(prods), block):
                inputs = [policy_input(p, pm_template(self.oc.seed, p.id, r, k)) for p in prods[c:c + block]]
                gens = self.group.generate(inputs, n=self.oc.samples_per_product, temperature=self.cfg.policy.temperature,
                                           seed=self.oc.seed * 7919 + r + 104729 * (c // block))
                rows = candidate_pairs(prods[c:c + block], gens, r, self.oc.seed, state.step, n_templates=k)
                self.put(rows, plan.products)
                pairs += rows
            self.gen_s[r] = time.perf_counter() - t
            state.pending[key] = pairs
        self.fed_rounds.add(r)

    def take(self, kind: str, index: int, n_rows: int):
        """Yield the rows of segment (kind, index) as they arrive; rows of other segments are kept."""
        key, got = (kind, index), 0
        while got < n_rows:
            if self.buffer.get(key):
                rows = self.buffer.pop(key)
            else:
                block = self.stream.next_block()
                seg = (block[0].kind, block[0].round)
                if seg != key:
                    self.buffer.setdefault(seg, []).extend(block)
                    continue
                rows = block
            got += len(rows)
            yield rows


def policy_input(p, template: int = 0) -> ProductPrompt:
    """What a policy rank needs of a product to describe it: text, the instruction template, and where
    the image is."""
    return ProductPrompt(title=p.title, attributes=p.attributes, template=template, image_ref=p.image_ref)
