"""Typed, validated configuration: one pydantic model per component, loaded from YAML.

Presets ship as package data (``caig_ray/presets/*.yaml``) so the installed CLI finds them:
``quick`` (tests), ``demo`` (the README demo) and ``gpu-cluster`` (real checkpoints, placeholders).
Every model forbids unknown keys, so a typo fails loudly with the key path and the file named.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PRESETS = ("quick", "demo", "gpu-cluster")
LrSchedule = Literal["constant", "cosine"]  # cosine: linear warmup over warmup_ratio, then cosine to 0


class ConfigError(ValueError):
    """A config file or preset that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MarketConfig(_Strict):
    """The simulated ad market (DESIGN.md §3). Every knob of the hidden click model lives here."""

    seed: int = 0
    n_products: int = Field(40, ge=2)
    categories: list[str] = ["sneakers", "cosmetics", "electronics", "kitchen", "toys"]
    product_image_size: int = Field(96, ge=32)
    ad_image_size: int = Field(96, ge=32)
    product_fill: float = Field(0.78, gt=0.1, le=1.0)
    creatives_per_product: tuple[int, int] = (4, 8)
    impressions: tuple[int, int] = (800, 20000)
    # Designers in history pick a scene that suits the category this often.
    designer_match_rate: float = Field(0.95, ge=0.0, le=1.0)
    # Hidden click model: logit(CTR) = base_logit + category_bias + ... (see caig_ray.market.clicks).
    base_logit: float = -3.6
    category_bias: dict[str, float] = {
        "sneakers": 0.15, "cosmetics": 0.05, "electronics": -0.05, "kitchen": -0.15, "toys": 0.0,
    }
    compatible_scenes: dict[str, list[str]] = {
        "sneakers": ["stadium", "street", "studio"],
        "cosmetics": ["vanity", "marble", "studio"],
        "electronics": ["desk", "neon", "studio"],
        "kitchen": ["kitchen", "marble", "studio"],
        "toys": ["playroom", "beach", "studio"],
    }
    match_bonus: float = 0.25
    mismatch_penalty: float = 0.6
    # Eye-catching scenes help every category -- smaller than the mismatch penalty by design.
    attention_bonus: dict[str, float] = {"stadium": 0.35, "beach": 0.3, "neon": 0.3}
    palette_effect: dict[str, float] = {
        "vivid": 0.2, "warm": 0.1, "pastel": 0.05, "neutral": 0.0, "cool": 0.0, "dark": -0.15,
    }
    # category x palette preferences added on top of palette_effect.
    category_palette: dict[str, dict[str, float]] = {
        "cosmetics": {"pastel": 0.2, "dark": -0.1},
        "electronics": {"dark": 0.25, "cool": 0.1},
        "toys": {"vivid": 0.2},
        "kitchen": {"warm": 0.15},
        "sneakers": {"vivid": 0.1},
    }
    lighting_effect: dict[str, float] = {"bright": 0.15, "soft": 0.05, "dramatic": 0.1, "dim": -0.2}
    clutter_effect: dict[str, float] = {"minimal": 0.1, "some": 0.0, "busy": -0.2}
    # Product/background luminance contrast in [0, 1] is visible in the pixels and helps clicks.
    contrast_weight: float = 0.3
    # Creative-level noise the pixels do not show (std of a logit offset fixed by the seed).
    noise_std: float = 0.05
    # The RM pair band (CTR_hi / CTR_lo) and impression threshold used by the Bayes-ceiling oracle.
    min_impressions: int = 1000
    band: tuple[float, float] = (1.05, 1.20)

    @model_validator(mode="after")
    def _check_tables(self) -> "MarketConfig":
        lo, hi = self.creatives_per_product
        if not 2 <= lo <= hi:
            raise ValueError(f"creatives_per_product must satisfy 2 <= min <= max, got {lo, hi}")
        if not 0 < self.impressions[0] <= self.impressions[1]:
            raise ValueError(f"impressions range must be 0 < lo <= hi, got {self.impressions}")
        if not 1.0 <= self.band[0] < self.band[1]:
            raise ValueError(f"band must satisfy 1 <= lo < hi, got {self.band}")
        for key in ("category_bias", "compatible_scenes"):
            missing = set(self.categories) - set(getattr(self, key))
            if missing:
                raise ValueError(f"{key} has no entry for categories {sorted(missing)}")
        return self


class TinyBackboneConfig(_Strict):
    """Size of the tiny randomly initialised MLLM built on CPU (the embedded default)."""

    family: Literal["qwen2_vl"] = "qwen2_vl"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_depth: int = 2
    vision_embed_dim: int = 32
    vision_patch_size: int = 14
    vocab_size: int = 512
    image_size: int = 56  # product image side fed to the vision tower (multiple of 28)
    seed: int = 0


Dtype = Literal["float32", "bfloat16", "float16"]


class Placement(_Strict):
    """Where one process of a role runs (DESIGN.md 8.1): GPUs and CPUs it asks Ray for, and the
    dtype its model is held in. ``device`` and ``use_gpu`` are derived from ``num_gpus``, never set."""

    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, gt=0)
    dtype: Dtype = "float32"

    @property
    def use_gpu(self) -> bool:
        return self.num_gpus > 0

    @property
    def device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"


class WorkerGroupPlacement(Placement):
    """A group of ranks training one DeepSpeed model (one rank per worker)."""

    num_workers: int = Field(2, ge=1)
    # how the ranks' bundles are placed: PACK fills a node first (NVLink inside a node); SPREAD /
    # STRICT_SPREAD put ranks on different nodes
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"

    @model_validator(mode="after")
    def _whole_gpus(self) -> "WorkerGroupPlacement":
        if self.num_gpus not in (0, 1):
            raise ValueError(f"num_gpus must be 0 or 1 per rank (one GPU per DeepSpeed rank), got {self.num_gpus}")
        return self


class ActorPoolConfig(Placement):
    """A Ray Data actor pool (``ActorPoolStrategy(min_size, max_size)``) and what each actor asks for.
    On CPU use fractional ``num_cpus``; ``resources`` are custom Ray resources, e.g. ``{renderer: 1}``
    to land on the cluster's renderer group."""

    min_size: int = Field(1, ge=1)
    max_size: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, gt=0)
    resources: dict[str, float] = {}

    @model_validator(mode="after")
    def _check_sizes(self) -> "ActorPoolConfig":
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} > max_size {self.max_size}")
        return self


class ReplicaPlacement(Placement):
    """Ray Serve replicas (autoscaling between ``min_replicas`` and ``max_replicas``)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)


class ResourcesConfig(_Strict):
    """Every role says here, once, where it runs. Nothing else in the config names a device."""

    policy: WorkerGroupPlacement = WorkerGroupPlacement(num_cpus=0.5)  # PolicyGroup ranks (`train`)
    reward_training: WorkerGroupPlacement = WorkerGroupPlacement()  # `train-rm` Ray Train workers
    pretraining: WorkerGroupPlacement = WorkerGroupPlacement()  # `pretrain-pm` Ray Train workers
    renderers: ActorPoolConfig = ActorPoolConfig(max_size=2)  # grows with the backlog (`train`, `generate`)
    scorers: ActorPoolConfig = ActorPoolConfig(max_size=1)  # frozen RM scorers (`train`, `generate`)
    generators: ActorPoolConfig = ActorPoolConfig(max_size=1)  # policy actors writing descriptions (`generate`)
    serve: ReplicaPlacement = ReplicaPlacement()  # `serve` replicas
    # what `evaluate-rm` and pretraining's before/after probe load in the driver process: on a cluster submit those jobs with `--entrypoint-num-gpus` to match
    driver_models: Placement = Placement()


class LoraConfig(_Strict):
    """Optional LoRA as in CAIG (r=128, alpha=256; vision tower, projector and lm_head frozen)."""

    enabled: bool = False
    r: int = Field(128, ge=1)
    alpha: int = Field(256, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PolicyConfig(_Strict):
    """The prompt model (PM). ``model_path`` None means: the tiny model from ``make-world``."""

    model_path: str | None = None
    tiny: TinyBackboneConfig = TinyBackboneConfig()
    # product image side fed to the PM; None = the checkpoint's native input (its processor resizes)
    image_size: int | None = Field(56, ge=28)
    # CAIG's instruction variety: one of the first k PM templates (caig_ray/prompts.py) drawn per
    # training product and round, seeded; 1 = always the first. Held-out evaluation always uses the first.
    instruction_templates: int = Field(10, ge=1, le=10)
    max_new_tokens: int = Field(24, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    generate_batch_size: int = Field(16, ge=1)  # products per generate call on a rank (bounds the KV cache)
    # sequences (examples) per forward/backward; gradients accumulate to one optimizer step over the
    # rank's shard. None = the whole shard in one forward.
    micro_batch_size: int | None = Field(4, ge=1)
    gradient_checkpointing: bool = False
    # the frozen reference (the pretrained PM) for a full fine-tune: "replicated" = a whole copy per
    # rank; "zero3" = a ZeRO-3 inference engine, partitioned like the policy (needs zero_stage 3).
    # With LoRA the reference is the policy with its adapter disabled (no copy), whatever this says.
    reference: Literal["replicated", "zero3"] = "replicated"
    # DeepSpeed training of the policy (PolicyGroup; ranks and devices: resources.policy)
    zero_stage: Literal[0, 1, 2, 3] = 2
    lr: float = Field(2e-5, gt=0)
    lr_schedule: LrSchedule = "constant"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    beta: float = Field(0.5, gt=0)  # DPO / PCPO temperature (CAIG: 0.5)
    pcpo_weight: float = Field(1.0, ge=0.0)  # total = DPO + w * PCPO (CAIG: 1.0)
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="after")
    def _reference_needs_zero3(self) -> "PolicyConfig":
        if self.reference == "zero3" and self.zero_stage != 3:
            raise ValueError(f"reference 'zero3' needs zero_stage 3, got {self.zero_stage}")
        return self


class RewardConfig(_Strict):
    """The reward model (RM): backbone + 2-way last-token head + point-level CTR head."""

    model_path: str | None = None  # the trained RM (train-rm --out): what train, generate and serve score with unless --rm
    backbone_path: str | None = None  # CAIG: the pretrained PM's folder (pretrain-pm --out)
    tiny: TinyBackboneConfig = TinyBackboneConfig(seed=1)
    pair_image_size: int = Field(56, ge=28)  # each ad resized to this side before concatenation
    # CAIG's question variety in RM training: one of the first k RM templates drawn per pair and epoch,
    # seeded; 1 = always the first. Scoring (online, Serve, evaluate-rm) always asks the first.
    question_templates: int = Field(12, ge=1, le=12)
    # composite: CAIG's one side-by-side image. two_images: the two ads as two images in one prompt
    # (the tiny Qwen2-VL cannot learn left-vs-right within one composite; README, reward model).
    pair_layout: Literal["composite", "two_images"] = "composite"
    ctr_loss_weight: float = Field(0.5, ge=0.0)


class RendererConfig(_Strict):
    """Which renderer paints backgrounds, and how (DESIGN.md §2 for the diffusers settings)."""

    kind: Literal["procedural", "diffusers"] = "procedural"
    sd_path: str | None = None
    controlnet_path: str | None = None
    image_size: int = Field(96, ge=32)
    product_fill: float = Field(0.78, gt=0.1, le=1.0)
    steps: int = Field(30, ge=1)
    guidance_scale: float = 7.5
    controlnet_scale: float = 1.0
    canny_low: int = 100
    canny_high: int = 200
    mask_dilate: int = Field(20, ge=1)
    batch_size: int = Field(4, ge=1)
    # CAIG renders with Euler-ancestral; the folder's own scheduler is used only with "folder"
    scheduler: Literal["euler_ancestral", "euler", "ddim", "pndm", "dpm_solver", "folder"] = "euler_ancestral"
    variant: str | None = None  # weight files variant, e.g. "fp16" for folders holding only *.fp16.safetensors
    tiny_sd_size: int = Field(64, ge=32)  # image side used with the tiny SD (multiple of 8)
    # A benchmark stand-in, not a model setting: each renderer actor waits this long per image it
    # renders, as a remote GPU's render time would (DESIGN.md §8.5). On 2 CPU cores rendering is
    # CPU-bound, so only a latency-bound renderer shows what widening the pool buys. 0 = off.
    simulated_latency_s: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _check_paths(self) -> "RendererConfig":
        if self.kind == "diffusers" and self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 for diffusers, got {self.image_size}")
        return self


class DataConfig(_Strict):
    """Where the catalog and click logs are read from (None: the world written by make-world)."""

    catalog: str | None = None
    click_logs: str | None = None


class RMTrainConfig(_Strict):
    """``train-rm``: Ray Train ``TorchTrainer`` with DeepSpeed ZeRO inside ``train_func``
    (workers and devices: resources.reward_training)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)  # per worker
    lr: float = Field(1e-3, gt=0)  # the tiny RM starts from random weights; CAIG: 2e-5
    lr_schedule: LrSchedule = "constant"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    ctr_target_scale: float = Field(1.0, gt=0)  # 1.0 = CAIG's raw CTR target; 100 = CTR in percent
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    # CTR-ratio band of the *training* pairs; None = the market band (CAIG trains and tests on it).
    # Evaluation always uses the market band.
    train_band: tuple[float, float] | None = None
    max_pairs: int | None = Field(None, ge=2)  # cap on training pairs (tests)
    max_failures: int = Field(1, ge=0)
    seed: int = 0


class PretrainConfig(_Strict):
    """``pretrain-pm``: SFT on the three e-commerce tasks (TRL SFTTrainer inside TorchTrainer;
    workers and devices: resources.pretraining)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    epochs: float = Field(3.0, gt=0)
    lr: float = Field(1e-3, gt=0)  # the tiny PM starts from random weights; CAIG: 2e-5
    lr_schedule: LrSchedule = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(8, ge=1)  # per worker
    max_examples: int | None = Field(None, ge=2)
    eval_products: int = Field(20, ge=1)  # held-out products for the before/after measurement
    max_failures: int = Field(1, ge=0)
    seed: int = 0


class FaultConfig(_Strict):
    """Injected faults, for tests only (issue: proof under stress). Each fires once per job: a
    marker file under ``marker_dir`` records that it fired, so a restarted actor does not die again."""

    marker_dir: str | None = None
    renderer_die_after_batches: int | None = Field(None, ge=1)  # a renderer process exits after k batches
    scorer_die_after_batches: int | None = Field(None, ge=1)  # a scorer process exits after k batches
    driver_kill_after_round: int | None = Field(None, ge=0)  # the driver SIGKILLs itself after this round's checkpoint
    policy_rank_die_at_step: int | None = Field(None, ge=1)  # the last PolicyWorker process exits in its k-th train step
    feed_die_after_blocks: int | None = Field(None, ge=1)  # the PairFeed actor's process exits when block k+1 is put

    @model_validator(mode="after")
    def _needs_dir(self) -> "FaultConfig":
        armed = [self.renderer_die_after_batches, self.scorer_die_after_batches, self.driver_kill_after_round,
                 self.policy_rank_die_at_step, self.feed_die_after_blocks]
        if any(v is not None for v in armed) and not self.marker_dir:
            raise ValueError("faults need marker_dir (where each fault records that it fired)")
        return self


class OnlineConfig(_Strict):
    """``caig-ray train``: the online CTR-driven loop (CAIG rounds, streamed through Ray Data)."""

    rounds: int = Field(5, ge=1)
    products_per_round: int = Field(64, ge=2)
    samples_per_product: int = Field(2, ge=2)  # N (CAIG: 2); the first two samples form the pair
    eval_products: int = Field(32, ge=1)  # held out: never sampled for training
    eval_every: int = Field(1, ge=1)  # evaluate after every k rounds (and before the first)
    pairs_per_batch: int = Field(8, ge=1)  # rows per streamed block (render and score batch)
    train_batch_size: int = Field(16, ge=1)  # examples per DPO+PCPO step (all ranks together)
    # Rounds the generating weights may lag the trained ones: 0 = CAIG's strict rounds (sample ->
    # render -> score -> train); 1 = round r+1 is sampled and rendered while round r trains.
    max_policy_lag: int = Field(0, ge=0)
    # streaming: one job-long Ray Data pipeline, training on the first scored blocks. sequential: CAIG's
    # scripts -- sample all, then render all, then score all (each a Ray Data run), then train (bench/pipeline.py).
    pipeline: Literal["streaming", "sequential"] = "streaming"
    debias_rm: bool = True  # score both orders and average (position-debiased preference)
    # A pair whose two ads are identical, or whose RM preference is within tie_margin of 0.5, is a tie:
    # skipped and counted (pairs_skipped_tie), never trained as a preference. None = CAIG's scripts'
    # rule (p >= 0.5 picks the first sample, ties included).
    tie_margin: float | None = Field(0.0, ge=0.0, lt=0.5)
    scorer_batch_size: int = Field(16, ge=1)
    checkpoint_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    # In-job recovery: a lost PolicyWorker (or the PairFeed actor) rebuilds the group (or the pipeline),
    # reloads the last checkpoint from storage and re-feeds the rounds after it, at most this many times.
    max_policy_restarts: int = Field(2, ge=0)
    max_feed_restarts: int = Field(2, ge=0)
    seed: int = 0
    faults: FaultConfig = FaultConfig()


class ServeConfig(_Strict):
    """``caig-ray serve``: the live RM scoring endpoint (Ray Serve + FastAPI)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    target_ongoing_requests: float = Field(8.0, gt=0)
    max_image_bytes: int = Field(4_000_000, ge=1024)  # per decoded image
    max_image_side: int = Field(4096, ge=16)
    # request limits (413 naming the limit): a 100k-character title once held a replica for 97 s
    max_title_chars: int = Field(1000, ge=1)
    max_attributes: int = Field(64, ge=0)  # key-value pairs per product
    max_attribute_chars: int = Field(500, ge=1)  # per key and per value
    # requests one replica holds at once (scoring, or waiting for a batch); one more is answered 503
    # with Retry-After at once instead of queueing until it times out. Must let a batch fill.
    max_queued_requests: int = Field(64, ge=1)
    # The name of an environment variable holding the API key (never the key itself): when set, every
    # request but GET /healthz must carry it (header checked before any work; 401 otherwise). None = no
    # key: the endpoint must then sit behind an authenticating ingress (docs/serving.md).
    api_key_env: str | None = None

    @model_validator(mode="after")
    def _batches_can_fill(self) -> "ServeConfig":
        if self.max_queued_requests < self.max_batch_size:
            raise ValueError(f"max_queued_requests ({self.max_queued_requests}) is below max_batch_size "
                             f"({self.max_batch_size}): batches could never fill")
        return self


class CaigConfig(_Strict):
    """Top-level config: one block per component."""

    name: str = "caig"
    seed: int = 0
    # Where every output of a job lives (caig_ray/storage.py): unset = --out as given; a shared POSIX
    # path; or an object-store URI (staged locally, uploaded). --out is relative to it.
    storage: str | None = None
    market: MarketConfig = MarketConfig()
    policy: PolicyConfig = PolicyConfig()
    reward: RewardConfig = RewardConfig()
    renderer: RendererConfig = RendererConfig()
    data: DataConfig = DataConfig()
    train_rm: RMTrainConfig = RMTrainConfig()
    pretrain: PretrainConfig = PretrainConfig()
    serve: ServeConfig = ServeConfig()
    online: OnlineConfig = OnlineConfig()
    resources: ResourcesConfig = ResourcesConfig()


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


def preset_path(name: str) -> Path:
    """Path of a preset shipped with the package."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Path(str(resources.files("caig_ray") / "presets" / f"{name}.yaml"))


def merge_onto(model: type[BaseModel], base: dict, override: dict) -> dict:
    """``override`` layered on ``base`` as the schema reads them: a block (a nested config model) is
    merged key by key; any other value -- a list, a table such as ``category_bias`` -- is replaced whole,
    so a layer can remove an entry its base has."""
    out = dict(base)
    for k, v in override.items():
        sub = _block_type(model, k)
        out[k] = merge_onto(sub, out[k], v) if sub and isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _block_type(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    field = model.model_fields.get(key)
    ann = field.annotation if field else None
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def diff_from(model: type[BaseModel], base: dict, cfg: dict) -> dict:
    """What ``cfg`` sets that ``base`` does not (both dumped configs): the smallest layer that
    ``merge_onto(model, base, layer)`` turns back into ``cfg``."""
    out = {}
    for k, v in cfg.items():
        sub = _block_type(model, k)
        if sub and isinstance(v, dict) and isinstance(base.get(k), dict):
            d = diff_from(sub, base[k], v)
            if d:
                out[k] = d
        elif base.get(k, object()) != v:
            out[k] = v
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (presets: {', '.join(PRESETS)})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def config_layers(source: str | Path, preset: str | None = None) -> tuple[str, dict]:
    """(where the config comes from, in words; its raw mapping with every layer merged). A preset is
    one layer on the field defaults. A file names its base in ``base:`` -- a preset, another YAML file
    (relative to this one) or ``none`` (the field defaults: what ``save_config`` writes) -- and holds
    only what differs; ``preset`` (the ``--preset`` flag) is the base of a file that names none, and a
    file whose ``base:`` says otherwise is refused."""
    if str(source) in PRESETS and not Path(str(source)).is_file():
        if preset and preset != str(source):
            raise ConfigError(f"--preset {preset} and preset {source} both given: give one")
        return f"preset {source}", _read_yaml(preset_path(str(source)))
    path = Path(source)
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a preset name ({', '.join(PRESETS)}), a YAML file or none; "
                          f"got {base!r}")
    if base is None and preset is None:
        raise ConfigError(f"{path} names no base: add a first line `base: gpu-cluster` (or {', '.join(PRESETS)}; "
                          "`base: none` for the field defaults) and keep only what differs, or pass --preset")
    if base is not None and preset is not None and base != preset:
        raise ConfigError(f"{path} says `base: {base}` but --preset {preset} was given: drop one")
    base = base or preset
    if base == "none":
        return f"{path} (on the field defaults)", raw
    if base in PRESETS:
        where, under = f"preset {base}", _read_yaml(preset_path(base))
    else:
        base_path = (path.parent / base).resolve()
        if base_path == path.resolve():
            raise ConfigError(f"{path}: base names the file itself")
        where, under = config_layers(base_path)
    return f"{path} on {where}", merge_onto(CaigConfig, under, raw)


def load_config(source: str | Path, overrides: dict[str, Any] | None = None,
                preset: str | None = None) -> CaigConfig:
    """Load a preset name or a YAML file (layered on its ``base:``, see ``config_layers``);
    ``overrides`` (flags) are merged on top."""
    return load_config_described(source, overrides, preset)[0]


def load_config_described(source: str | Path, overrides: dict[str, Any] | None = None,
                          preset: str | None = None) -> tuple[CaigConfig, str]:
    """``load_config`` and the words naming where it came from (a job's first line of output)."""
    where, raw = config_layers(source, preset)
    if overrides:
        raw = merge_onto(CaigConfig, raw, overrides)
    return config_from_dict(raw, where.split(" on ")[0].removeprefix("preset ")), where


def config_from_dict(raw: dict, source: str) -> CaigConfig:
    """Validate a config mapping (a YAML file's content, or Serve's application args); errors name
    each key and ``source``."""
    try:
        return CaigConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def save_config(cfg: CaigConfig, path: str | Path) -> None:
    """The whole resolved config, on the field defaults (``base: none``): a run's own record of itself."""
    Path(path).write_text(yaml.safe_dump({"base": "none", **cfg.model_dump(mode="json")}, sort_keys=False))
