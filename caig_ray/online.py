"""The online loop's pure parts: which products each round samples, the candidate pairs with their
ids and seeds, the market oracle's verdict on a rendered ad, the lift with its interval, and the run's state.

Everything here is a function of (seed, round) so an interrupted job that resumes sees the very
data order an uninterrupted one sees. ``caig_ray/loop/`` runs the rounds with them; ``jobs/train.py`` wires it to the Ray actors.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from caig_ray.config import MarketConfig
from caig_ray.market.clicks import ClickModel, noise_key
from caig_ray.prompts import clean_prompt, pm_instruction, template_index
from caig_ray.rows import CandidatePair


def split_eval_products(product_ids: list[str], n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, eval) product ids: ``n_eval`` held-out products the loop never trains on."""
    ids = sorted(product_ids)
    if n_eval >= len(ids):
        raise ValueError(f"online.eval_products={n_eval} leaves no product to train on (catalog has {len(ids)})")
    order = np.random.default_rng([seed, 41]).permutation(len(ids))
    held = {ids[i] for i in order[:n_eval]}
    return [i for i in ids if i not in held], [i for i in ids if i in held]


def round_products(train_ids: list[str], round_index: int, k: int, seed: int) -> list[str]:
    """The ``k`` products sampled in round ``round_index`` (without replacement; all of them if fewer)."""
    rng = np.random.default_rng([seed, 43, round_index])
    pick = rng.permutation(len(train_ids))[: min(k, len(train_ids))]
    return [train_ids[i] for i in sorted(pick)]


def render_seed(seed: int, product_id: str, round_index: int) -> int:
    """One seed per (product, round): both candidates of a pair are painted with it (CAIG)."""
    return int(np.random.default_rng([seed, 47, round_index, *product_id.encode()]).integers(0, 2**31 - 1))


def pm_template(seed: int, product_id: str, round_index: int, n_templates: int) -> int:
    """The PM instruction template of (product, round): the same for sampling and for training on it."""
    return template_index(seed, product_id, n_templates, round_index)


def candidate_pairs(products: list, generations: list[dict], round_index: int, seed: int,
                    policy_version: int, kind: str = "train", n_templates: int = 1) -> list[CandidatePair]:
    """One candidate pair per product from its sampled descriptions (the first two samples).

    Each pair: ``pair_id`` (unique in a job), ``kind``, ``round``, ``product_id``, ``title``,
    ``category``, ``instruction``, ``desc_a``/``desc_b`` (cleaned as the renderer reads them),
    ``ids_a``/``ids_b`` (the sampled token ids, trained on),
    ``seed`` (shared by both renders) and ``policy_version`` (train steps taken when sampled)."""
    if len(products) != len(generations):
        raise ValueError(f"{len(products)} products but {len(generations)} generations")
    out = []
    for p, g in zip(products, generations):
        a, b = g["descriptions"][0], g["descriptions"][1]
        out.append(CandidatePair(
            pair_id=f"{kind}-r{round_index:03d}-{p.id}", kind=kind, round=round_index,
            product_id=p.id, title=p.title, category=p.category or "",
            instruction=pm_instruction(p.title, p.attributes, pm_template(seed, p.id, round_index, n_templates)),
            desc_a=clean_prompt(a), desc_b=clean_prompt(b),
            # what the policy sampled, token for token: DPO trains on these (cleaning is for the renderer)
            ids_a=[int(t) for t in g["token_ids"][0]] if g.get("token_ids") is not None else None,
            ids_b=[int(t) for t in g["token_ids"][1]] if g.get("token_ids") is not None else None,
            seed=render_seed(seed, p.id, round_index), policy_version=policy_version,
        ))
    return out


def match_rate(verdicts: list[dict]) -> float | None:
    """Of the ads that set a scene, the share whose scene suits the product (None if none sets one)."""
    scened = [v for v in verdicts if v["has_scene"]]
    return float(np.mean([v["match"] for v in scened])) if scened else None


def paired_lift(tuned: list[float], base: list[float]) -> dict:
    """Mean paired difference tuned - base with a 95% normal-approximation interval
    (mean ± 1.96·sd/√n) and the relative lift mean(tuned)/mean(base) - 1."""
    t, b = np.asarray(tuned, dtype=float), np.asarray(base, dtype=float)
    if t.shape != b.shape or t.size < 2:
        raise ValueError(f"paired_lift needs two equal-length lists of >= 2 values, got {t.size} and {b.size}")
    d = t - b
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    return {"diff": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)],
            "relative": float(t.mean() / b.mean() - 1.0), "n": int(d.size)}


def eval_market_metrics(rows: list[CandidatePair], verdicts: list[dict]) -> dict:
    """The market's metrics of one evaluation over every ad (rows: the evaluation's pairs; verdicts:
    ``market_verdicts``' keys, a = tuned PM, b = pretrained PM). ``lift`` pairs by product: each
    product's mean over its samples, so products, not ads, are the independent units of its CI."""
    by_product: dict[str, list[tuple[float, float]]] = {}
    for x, v in zip(rows, verdicts):
        by_product.setdefault(x.product_id, []).append((v["true_ctr_a"], v["true_ctr_b"]))
    means = np.array([np.mean(ab, axis=0) for ab in by_product.values()])  # per product: (tuned, base)
    lift = paired_lift(means[:, 0].tolist(), means[:, 1].tolist()) if len(means) > 1 else None

    def mismatch(side: str, vs: list[dict]) -> float:
        return float(np.mean([v[f"has_scene_{side}"] and not v[f"match_{side}"] for v in vs]))

    cats = sorted({x.category for x in rows})
    in_cat = {c: [v for x, v in zip(rows, verdicts) if x.category == c] for c in cats}
    return {
        "true_ctr": float(np.mean([v["true_ctr_a"] for v in verdicts])),
        "base_true_ctr": float(np.mean([v["true_ctr_b"] for v in verdicts])),
        "lift": lift, "n_ads": len(verdicts),
        "match_rate": match_rate([{"match": v["match_a"], "has_scene": v["has_scene_a"]} for v in verdicts]),
        "base_match_rate": match_rate([{"match": v["match_b"], "has_scene": v["has_scene_b"]} for v in verdicts]),
        "mismatch_share": mismatch("a", verdicts), "base_mismatch_share": mismatch("b", verdicts),
        "mismatch_share_by_category": {c: mismatch("a", vs) for c, vs in in_cat.items()},
        "base_mismatch_share_by_category": {c: mismatch("b", vs) for c, vs in in_cat.items()},
        "scene_rate": float(np.mean([v["has_scene_a"] for v in verdicts])),
    }


class MarketOracle:
    """The market's verdict on rendered ads (evaluation only; the RM and the policy never see it)."""

    def __init__(self, cfg: MarketConfig):
        self.model = ClickModel(cfg)

    def verdict(self, category: str, latent: str | dict, description: str, seed: int, title: str = "") -> dict:
        """True CTR, scene, match and whether a scene was set, for one ad from its rendered latent
        (``title``: the product's, where its tier is named)."""
        lat = json.loads(latent) if isinstance(latent, str) else latent
        return {"true_ctr": self.model.true_ctr(category, lat, noise_key(description, seed), title),
                "scene": lat["scene"],
                "match": self.model.match(category, lat["scene"]), "has_scene": lat["scene"] != "plain"}


@dataclass
class RunState:
    """What an online run's checkpoint holds besides the weights (``state.json``, written last).

    ``next_round``: the first round not yet trained; ``step``: optimizer steps taken; ``pending``:
    round (as text, a JSON key) -> the candidate pairs sampled for it and not yet trained (rounds
    sampled ahead under ``max_policy_lag`` keep their samples across a resume); ``eval_base``: the
    pretrained PM's held-out descriptions (``online.eval_samples`` per product), kept for every evaluation; ``rounds`` / ``evals``: the
    per-round and per-evaluation records so far (summary.json's history); ``run_id``: the run it
    belongs to (``RunRecord``): checkpoint rotation and ``--resume`` touch only the run's own."""

    next_round: int = 0
    step: int = 0
    pending: dict[str, list[CandidatePair]] = field(default_factory=dict)
    eval_base: list[list[str]] | None = None
    rounds: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    run_id: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunState":
        d = json.loads(text)
        d["pending"] = {k: [CandidatePair.from_row(_with_defaults(CandidatePair, r)) for r in rows]
                        for k, rows in d.get("pending", {}).items()}
        return cls(**d)


def _with_defaults(cls, row: dict) -> dict:
    """A stored row with the defaults of fields added after it was written (a checkpoint of an older
    version: its pending pairs lack ``image_ref``/``sample``/``rm_score``, which take their defaults)."""
    import dataclasses

    return {**{f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}, **row}


@dataclass
class RunRecord:
    """``run.json``: which run a run folder holds and how far it got -- written when the run starts,
    after every checkpoint and when it finishes. A folder holds one run: a fresh run refuses a used
    folder, ``--resume`` continues only the run named here and refuses a finished one.

    ``run_id``: ``caig_ray.storage.new_run_id()``; ``status``: "running" or "finished";
    ``rounds_done``: rounds trained and checkpointed; ``rounds``: the run's ``online.rounds``."""

    run_id: str
    started_at: str
    rounds: int
    status: str = "running"
    rounds_done: int = 0
    finished_at: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RunRecord":
        return cls(**json.loads(text))

    def describe(self) -> str:
        if self.status == "finished":
            return f"run {self.run_id} finished at round {self.rounds_done}"
        return f"run {self.run_id} (stopped after round {self.rounds_done} of {self.rounds})"
