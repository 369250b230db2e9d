"""The rows that cross process boundaries in ``caig-ray train`` and ``generate``, one typed class
each (as OpenRLHF's ``Experience``), with the Arrow schema of their columnar form (Ray Data blocks,
parquet files).

    driver (caig_ray.loop.Feed) --CandidatePair--> PairFeed --> Renderer pool --> RewardScorer pool
        --ScoredPair--> driver (RoundTrainer, Evaluator)
    driver --ProductPrompt--> policy ranks (generate: descriptions to sample)
    driver --PreferenceExample--> policy ranks (DPO+PCPO steps)
    driver --PairRecord--> pairs/round_XXX.parquet          driver --eval_table--> pairs/eval_XXX.parquet

and in ``caig-ray generate`` (a streaming Ray Data pipeline, no driver in the data path):

    catalog rows --> Describer --ProductCandidates--> CandidateRenderer --> CandidateRanker --> write_generated

Every field is always present: a stage never decides what to do by which columns a row has. Inside a
Ray Data stage a block is columns (a dict of numpy arrays); ``CandidatePair.SCHEMA`` names the columns
the renderer receives, ``ScoredPair.SCHEMA`` the ones the driver gets back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

_IDS = pa.list_(pa.int64())


class _Row:
    SCHEMA: ClassVar[pa.Schema]

    def to_row(self) -> dict:
        """The row as plain values, in ``SCHEMA``'s order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_row(cls, row: dict):
        """The typed row from a dict holding (at least) every field; a missing field is named."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in row]
        if missing:
            raise KeyError(f"{cls.__name__}: row {row.get('pair_id', '?')!r} lacks {', '.join(missing)}")
        return cls(**{n: _plain(row[n], list_field=n in _LIST_FIELDS) for n in names})

    @classmethod
    def table(cls, rows: list) -> pa.Table:
        """``rows`` (typed) as one Arrow table of ``SCHEMA``."""
        return pa.Table.from_pylist([r.to_row() for r in rows], schema=cls.SCHEMA)


_LIST_FIELDS = {"ids_a", "ids_b", "chosen_ids", "rejected_ids"}


def _plain(value: Any, list_field: bool = False) -> Any:
    """Ray Data hands lists back as numpy arrays and numbers as numpy scalars: plain Python values. A
    null list that went through a numpy block comes back as NaN: None again."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if list_field and isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass
class CandidatePair(_Row):
    """Two descriptions of one product to render with one seed and score (driver -> pipeline).

    ``kind`` "train" (a round's pair) or "eval" (a held-out product's: ``sample`` = which of its
    ``online.eval_samples``, ``rm_score`` = whether the RM scores it; only the first sample is);
    ``ids_a``/``ids_b``: the sampled token ids DPO trains on (None for the pretrained PM's eval text);
    ``image_ref``: where the product image is (``caig_ray.data.catalog.image_ref``; set when fed)."""

    pair_id: str
    kind: str
    round: int
    product_id: str
    title: str
    category: str
    instruction: str
    desc_a: str
    desc_b: str
    seed: int
    policy_version: int
    ids_a: list[int] | None = None
    ids_b: list[int] | None = None
    image_ref: str = ""
    sample: int = 0
    rm_score: bool = True

    SCHEMA: ClassVar[pa.Schema] = pa.schema([
        ("pair_id", pa.string()), ("kind", pa.string()), ("round", pa.int64()), ("product_id", pa.string()),
        ("title", pa.string()), ("category", pa.string()), ("instruction", pa.string()), ("desc_a", pa.string()),
        ("desc_b", pa.string()), ("seed", pa.int64()), ("policy_version", pa.int64()), ("ids_a", _IDS),
        ("ids_b", _IDS), ("image_ref", pa.string()), ("sample", pa.int64()), ("rm_score", pa.bool_())])


@dataclass
class ScoredPair(CandidatePair):
    """A candidate pair rendered and scored (pipeline -> driver); its ads are in storage, never here.

    ``latent_a``/``latent_b``: what the procedural renderer painted (JSON; "" from a diffusion model);
    ``render_s``: the renderer's seconds on this pair's batch (on the batch's first row, 0 on the others);
    ``ads_part``: the ``pairs/ads/`` part holding both ads; ``same_ad``: both ads identical (a tie);
    ``p_left``: P_RM(ad a gets more clicks than ad b), ``p_left_debiased``: its mean with 1 - P of the
    swapped order; ``ctr_left``/``ctr_right``: the RM's point CTRs. NaN where ``rm_score`` is False."""

    latent_a: str = ""
    latent_b: str = ""
    render_s: float = 0.0
    renderer_pid: int = 0
    ads_part: str = ""
    same_ad: bool = False
    p_left: float = math.nan
    p_left_debiased: float = math.nan
    ctr_left: float = math.nan
    ctr_right: float = math.nan

    SCHEMA: ClassVar[pa.Schema] = pa.schema(list(CandidatePair.SCHEMA) + [
        ("latent_a", pa.string()), ("latent_b", pa.string()), ("render_s", pa.float64()),
        ("renderer_pid", pa.int64()), ("ads_part", pa.string()), ("same_ad", pa.bool_()),
        ("p_left", pa.float64()), ("p_left_debiased", pa.float64()), ("ctr_left", pa.float64()),
        ("ctr_right", pa.float64())])

    def p_first(self, debiased: bool) -> float:
        """The RM's P(ad of ``desc_a`` wins) the loop decides with (``online.debias_rm``)."""
        return self.p_left_debiased if debiased else self.p_left


@dataclass
class ProductPrompt:
    """One product for the policy to describe (driver -> policy ranks, ``generate``): its text, the
    instruction template (``caig_ray.prompts.pm_instruction``) and its image -- ``image_ref`` (where it
    is: the online loop's driver never holds an image, the rank loads it) or the ``image`` itself
    (PNG bytes or a PIL image)."""

    title: str
    attributes: dict[str, str] | None = None
    template: int = 0
    image_ref: str = ""
    image: Any = None


@dataclass
class PreferenceExample(_Row):
    """One DPO+PCPO example (driver -> policy ranks): the product (``image``, loaded on the rank that
    trains on it from ``image_ref``), the instruction, the chosen and rejected descriptions (and their
    sampled token ids, trained on when given), ``seed`` (its PCPO coin flip and mask) and ``p_chosen``
    (the RM's probability for the chosen ad)."""

    pair_id: str
    instruction: str
    chosen: str
    rejected: str
    seed: int
    image_ref: str = ""
    image: Any = None
    chosen_ids: list[int] | None = None
    rejected_ids: list[int] | None = None
    p_chosen: float = math.nan

    SCHEMA: ClassVar[pa.Schema] = pa.schema([
        ("pair_id", pa.string()), ("instruction", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
        ("seed", pa.int64()), ("image_ref", pa.string()), ("image", pa.binary()), ("chosen_ids", _IDS),
        ("rejected_ids", _IDS), ("p_chosen", pa.float64())])


CATALOG_ROW_SCHEMA = pa.schema([
    ("row", pa.int64()), ("id", pa.string()), ("title", pa.string()), ("category", pa.string()),
    ("attributes", pa.string()), ("image_path", pa.string()), ("image_bytes", pa.binary())])
"""A validated catalog row (dataplane/catalog.py writes them to ``valid/``): its row number in the
catalog, the product's text (``attributes`` as JSON) and its image, a file's path or the bytes."""


@dataclass
class ProductCandidates(_Row):
    """``caig-ray generate``'s row: one catalog product and its N candidate ads, filled stage by stage
    (jobs/generate.py): ``Describer`` (``descriptions``, ``duplicate``: N each, and ``seed``, the seed
    all N are painted with) -> ``CandidateRenderer`` (``ads``: N PNGs) -> ``CandidateRanker``
    (``win_rate``, ``ctr``, ``rank``: N each, rank 0 = best) -> ``write_generated``. The catalog fields
    are a validated catalog row's (``CATALOG_ROW_SCHEMA``); a stage not yet run leaves its fields empty
    lists."""

    row: int
    id: str
    title: str
    category: str | None
    attributes: str | None
    image_path: str | None
    image_bytes: bytes | None
    descriptions: list[str]
    duplicate: list[bool]
    seed: int
    ads: list[bytes] = dataclasses.field(default_factory=list)
    win_rate: list[float] = dataclasses.field(default_factory=list)
    ctr: list[float] = dataclasses.field(default_factory=list)
    rank: list[int] = dataclasses.field(default_factory=list)

    SCHEMA: ClassVar[pa.Schema] = pa.schema([
        *CATALOG_ROW_SCHEMA,
        ("descriptions", pa.list_(pa.string())), ("duplicate", pa.list_(pa.bool_())), ("seed", pa.int64()),
        ("ads", pa.list_(pa.binary())), ("win_rate", pa.list_(pa.float64())), ("ctr", pa.list_(pa.float64())),
        ("rank", pa.list_(pa.int64()))])

    @classmethod
    def of_catalog_row(cls, row: dict, descriptions: list[str], duplicate: list[bool], seed: int) -> "ProductCandidates":
        """A validated catalog row with the policy's N descriptions (the Describer's output)."""
        return cls(**{k: row[k] for k in CATALOG_ROW_SCHEMA.names}, descriptions=list(descriptions),
                   duplicate=list(duplicate), seed=int(seed))

    @classmethod
    def from_table(cls, table: pa.Table) -> list["ProductCandidates"]:
        """A block of ``SCHEMA`` (a stage's input) as typed rows; a missing column is named."""
        return [cls.from_row(r) for r in table.to_pylist()]


VERDICT_FIELDS = [("true_ctr", pa.float64()), ("scene", pa.string()), ("match", pa.bool_()), ("has_scene", pa.bool_())]
"""The simulated market's verdict on one ad (``caig_ray.online.MarketOracle.verdict``), per side a/b;
null off the simulated market."""


def _verdict_columns() -> list:
    return [(f"{name}_{side}", kind) for side in ("a", "b") for name, kind in VERDICT_FIELDS]


@dataclass
class PairRecord(_Row):
    """A planned pair's fate in a round (``pairs/round_XXX.parquet``, one row per planned pair).

    ``status``: "trained", "pending" (never came back: counted lost) or "skipped:<reason>" (tie,
    duplicate, fewer_examples_than_ranks); ``chosen``: "a"/"b" for a trained pair, "" for a skipped
    one; ``trained_at_step``: the step that trained it (-1: none); the market's verdicts per ad."""

    pair_id: str
    round: int
    product_id: str
    title: str
    category: str
    seed: int
    desc_a: str
    desc_b: str
    policy_version: int
    p_left: float
    p_left_debiased: float
    ids_a: list[int] | None
    ids_b: list[int] | None
    ads_part: str
    status: str = "pending"
    trained_at_step: int = -1
    chosen: str | None = None
    true_ctr_a: float | None = None
    scene_a: str | None = None
    match_a: bool | None = None
    has_scene_a: bool | None = None
    true_ctr_b: float | None = None
    scene_b: str | None = None
    match_b: bool | None = None
    has_scene_b: bool | None = None

    SCHEMA: ClassVar[pa.Schema] = pa.schema([
        ("pair_id", pa.string()), ("round", pa.int64()), ("product_id", pa.string()), ("title", pa.string()),
        ("category", pa.string()), ("seed", pa.int64()), ("desc_a", pa.string()), ("desc_b", pa.string()),
        ("policy_version", pa.int64()), ("p_left", pa.float64()), ("p_left_debiased", pa.float64()),
        ("ids_a", _IDS), ("ids_b", _IDS), ("ads_part", pa.string()), ("status", pa.string()),
        ("trained_at_step", pa.int64()), ("chosen", pa.string()), *_verdict_columns()])

    @classmethod
    def of(cls, pair: ScoredPair, verdicts: dict) -> "PairRecord":
        """A pair's record as it comes back from the pipeline (pending), with the market's verdicts."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in pair.to_row().items() if k in fields}, **verdicts)


def eval_table(pairs: list[ScoredPair], verdicts: list[dict]) -> pa.Table:
    """An evaluation's rows (``pairs/eval_XXX.parquet``): each held-out pair as scored (a = the tuned
    PM's ad, b = the pretrained PM's) without the renderer's latents, with the market's verdicts per ad
    (null off the simulated market)."""
    drop = {"latent_a", "latent_b"}
    schema = pa.schema([f for f in ScoredPair.SCHEMA if f.name not in drop] + _verdict_columns())
    rows = [{k: v for k, v in p.to_row().items() if k not in drop} | v for p, v in zip(pairs, verdicts)]
    return pa.Table.from_pylist(rows, schema=schema)
