"""What the loop needs of the policy and of the pipeline: the Ray implementations are
``caig_ray.actors.policy.PolicyGroup`` and ``caig_ray.dataplane.stream.PairStream`` / ``StagedPipeline``."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from caig_ray.rows import CandidatePair, PreferenceExample, ProductPrompt, ScoredPair


class Policy(Protocol):
    """The policy being tuned (every rank of it)."""

    def generate(self, products: list[ProductPrompt], n: int, temperature: float, seed: int) -> list[dict]:
        """``n`` descriptions per product: one dict per product with ``descriptions`` (and the sampled
        token ids)."""

    def train_step(self, examples: list[PreferenceExample]) -> dict:
        """One DPO+PCPO optimizer step over ``examples``; its metrics (``caig_ray.losses``)."""

    def save(self, path: str | Path, uri: str | None = None) -> None:
        """Weights and optimizer, every rank's part, to ``path`` (and ``uri`` in an object store)."""

    def load(self, path: str | Path, uri: str | None = None) -> None:
        """What ``save`` wrote."""


class Pipeline(Protocol):
    """Render and score: blocks of candidate pairs in, the same blocks scored, in feed order, out."""

    t0: float  # perf_counter() when it started: the clock of its pool trace
    wait_s: float  # seconds the caller spent blocked in next_block

    def put(self, rows: list[CandidatePair]) -> int:
        """Feed one block (pairs with ``image_ref`` set); its index."""

    def next_block(self) -> list[ScoredPair]:
        """The next scored block in feed order (waits until it is ready)."""
