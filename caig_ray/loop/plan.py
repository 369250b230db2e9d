"""Which products each round samples, which are held out, and how many blocks the pipeline carries."""

from __future__ import annotations

from caig_ray.online import RunState, round_products, split_eval_products


def _blocks(n_rows: int, size: int) -> int:
    return -(-n_rows // size)


class RoundPlan:
    """Plan: which products each round samples (``caig_ray.online.round_products``), which are held out,
    which rounds are evaluated, and how many blocks the pipeline will carry."""

    def __init__(self, oc, products: dict):
        self.oc, self.products = oc, products
        self.train_ids, self.eval_ids = split_eval_products(list(products), oc.eval_products, oc.seed)

    def eval_after(self, r: int) -> bool:
        return (r + 1) % self.oc.eval_every == 0 or r == self.oc.rounds - 1

    def round_products(self, r: int) -> list:
        return [self.products[i] for i in round_products(self.train_ids, r, self.oc.products_per_round, self.oc.seed)]

    def eval_products(self) -> list:
        return [self.products[i] for i in self.eval_ids]

    def n_blocks(self, state: RunState) -> int:
        """Blocks still to come from ``state`` on: every round's and every evaluation's."""
        oc, start = self.oc, state.next_round
        per_round = _blocks(min(oc.products_per_round, len(self.train_ids)), oc.pairs_per_batch)
        per_eval = _blocks(len(self.eval_ids) * oc.eval_samples, oc.pairs_per_batch)
        evals = sum(self.eval_after(r) for r in range(start, oc.rounds)) + (state.eval_base is None)
        return per_round * (oc.rounds - start) + per_eval * evals
