"""Typed, validated configuration: one pydantic model per component, loaded from YAML.

Presets ship as package data (``caig_ray/presets/*.yaml``) so the installed CLI finds them:
``quick`` (tests), ``demo`` (the README demo) and ``gpu-cluster`` (real checkpoints, placeholders).
Every model forbids unknown keys, so a typo fails loudly with the key path and the file named.
Every field carries its description as an attribute docstring (directly under the field): pydantic
puts it in the JSON schema, and ``docs/configuration.md`` is generated from that schema
(``python -m caig_ray.config_docs > docs/configuration.md``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from caig_ray.errors import CaigError

PRESETS = ("quick", "demo", "gpu-cluster", "demo-no-attention", "demo-never-mismatch")
LrSchedule = Literal["constant", "cosine"]  # cosine: linear warmup over warmup_ratio, then cosine to 0


class ConfigError(CaigError, ValueError):
    """A config file or preset that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class OptimizerConfig(_Strict):
    """The optimizer of every role that trains (policy, train-rm, pretrain-pm): AdamW at a peak ``lr`` on
    a schedule. One definition, one reader (``caig_ray/ds.py: adamw_with_schedule``; TRL's arguments for
    pretrain-pm); a role only sets its own defaults. The keys sit in the role's block (``policy.lr``)."""

    lr: float = Field(2e-5, gt=0)
    """Peak learning rate of AdamW (CAIG: 2e-5)."""
    lr_schedule: LrSchedule = "constant"
    """constant, or cosine: linear warmup over warmup_ratio of the steps, then cosine decay to 0."""
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of the training steps spent warming the learning rate up linearly."""


class MarketConfig(_Strict):
    """The simulated ad market: the catalog, the historical creatives and the hidden click model that
    scores them (``caig_ray/market/clicks.py``). Every knob of the hidden click model lives here."""

    seed: int = 0
    """Seed of the catalog (product titles, colours, shapes) and of the history (designers' choices,
    impressions, clicks): the same seed writes the same world."""
    n_products: int = Field(40, ge=2)
    """Products in the catalog, spread evenly over ``categories``."""
    categories: list[str] = ["sneakers", "cosmetics", "electronics", "kitchen", "toys"]
    """Product categories; ``category_bias`` and ``compatible_scenes`` need an entry for each."""
    product_image_size: int = Field(96, ge=32)
    """Side in pixels of each catalog product image (RGBA cut-out)."""
    ad_image_size: int = Field(96, ge=32)
    """Side in pixels of the historical ads (the click logs' images), painted by the procedural renderer."""
    product_fill: float = Field(0.78, gt=0.1, le=1.0)
    """Fraction of the ad side the product is scaled to in the historical ads."""
    creatives_per_product: tuple[int, int] = (4, 8)
    """[min, max] historical creatives per product (inclusive, drawn uniformly; 2 <= min <= max)."""
    impressions: tuple[int, int] = (800, 20000)
    """[lo, hi] impressions of a historical creative, drawn log-uniformly (0 < lo <= hi)."""
    designer_match_rate: float = Field(0.99, ge=0.0, le=1.0)
    """Probability that a designer in the history picks a scene that suits the category (else any scene):
    world v2 0.99, so the unsuitable cells of the history are nearly empty (docs/market.md)."""
    base_logit: float = -3.6
    """Hidden click model: the intercept of logit(CTR) = base_logit + category_bias + ...
    (see ``caig_ray/market/clicks.py``)."""
    category_bias: dict[str, float] = {
        "sneakers": 0.15, "cosmetics": 0.05, "electronics": -0.05, "kitchen": -0.15, "toys": 0.0,
    }
    """Logit offset per category (every category needs an entry)."""
    compatible_scenes: dict[str, list[str]] = {
        "sneakers": ["stadium", "street", "studio", "neon", "beach"],
        "cosmetics": ["vanity", "marble", "studio", "beach"],
        "electronics": ["desk", "neon", "studio", "street"],
        "kitchen": ["kitchen", "marble", "studio"],
        "toys": ["playroom", "beach", "studio", "neon"],
    }
    """Scenes that suit each category (the match oracle; every category needs an entry). World v2: each
    eye-catching scene suits three categories and not the other two."""
    match_bonus: float = 0.25
    """Logit bonus when the ad's scene suits the product's category."""
    mismatch_penalty: float = 0.6
    """Logit penalty when the scene does not suit the category (a plain background gets neither)."""
    attention_bonus: dict[str, float] = {"neon": 0.35, "beach": 0.3}
    """Logit bonus of eye-catching scenes in every category: a main effect, learnt from the categories they
    suit; smaller than the mismatch penalty, so an eye-catching scene that does not suit still loses."""
    palette_effect: dict[str, float] = {
        "vivid": 0.1, "warm": 0.05, "pastel": 0.05, "neutral": 0.0, "cool": 0.0, "dark": -0.05,
    }
    """Logit offset per colour palette of the background."""
    category_palette: dict[str, dict[str, float]] = {
        "cosmetics": {"pastel": 0.2, "dark": -0.1},
        "electronics": {"dark": 0.2, "cool": 0.1},
        "toys": {"vivid": 0.2},
        "kitchen": {"warm": 0.15},
        "sneakers": {"vivid": 0.1},
    }
    """Category x palette preferences (logit), added on top of ``palette_effect``."""
    tiers: dict[str, list[str]] = {
        "premium": ["premium", "luxury", "deluxe", "designer"],
        "value": ["budget", "value", "basic", "everyday"],
    }
    """Product tiers and the title words that name them: each product draws a tier (equally likely) and
    one of its words opens its title; the tier is in the title and attributes, never in the image."""
    tier_effect: dict[str, dict[str, float]] = {
        "premium": {"dark": 0.3, "neutral": 0.1, "vivid": -0.25, "dramatic": 0.15, "bright": -0.1,
                    "minimal": 0.1, "busy": -0.1},
        "value": {"vivid": 0.25, "warm": 0.1, "dark": -0.3, "bright": 0.15, "dramatic": -0.15},
    }
    """Tier x background preferences (logit), keyed by a palette, lighting or clutter value: the
    information only the product text carries (the oracle reads the tier from the title)."""
    lighting_effect: dict[str, float] = {"bright": 0.15, "soft": 0.05, "dramatic": 0.1, "dim": -0.2}
    """Logit offset per lighting of the background."""
    clutter_effect: dict[str, float] = {"minimal": 0.1, "some": 0.0, "busy": -0.2}
    """Logit offset per clutter level of the background."""
    contrast_weight: float = 0.3
    """Logit weight of the product/background luminance contrast in [0, 1]: visible in the pixels, it helps clicks."""
    noise_std: float = 0.05
    """Std of a creative-level logit offset the pixels do not show (fixed by the ad's description and render seed)."""
    min_impressions: int = 1000
    """Pairs (RM training, evaluation, the Bayes-ceiling oracle) use only creatives with more impressions than this."""
    band: tuple[float, float] = (1.05, 1.20)
    """CAIG's RM pair band: two creatives of a product form a pair when CTR_hi / CTR_lo lies in [lo, hi]
    (1 <= lo < hi). Evaluation always uses it; ``train_rm.train_band`` may widen training."""

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
        unknown = set(self.tier_effect) - set(self.tiers)
        if unknown:
            raise ValueError(f"tier_effect names tiers {sorted(unknown)} that tiers does not define")
        return self


class TinyBackboneConfig(_Strict):
    """Size of the tiny randomly initialised Qwen2-VL-shaped MLLM that ``make-world`` builds on CPU
    (the embedded default, used when no ``model_path`` / ``backbone_path`` is set)."""

    hidden_size: int = 64
    """Hidden size of the text decoder (and the vision merger's output); head dim = hidden_size / num_heads."""
    num_layers: int = 2
    """Text decoder layers."""
    num_heads: int = 4
    """Attention heads of the text decoder."""
    num_kv_heads: int = 2
    """Key/value heads of the text decoder (grouped-query attention)."""
    intermediate_size: int = 128
    """MLP width of the text decoder."""
    vision_depth: int = 2
    """Blocks of the vision tower."""
    vision_embed_dim: int = 32
    """Embedding width of the vision tower."""
    vision_patch_size: int = 14
    """Vision patch side in pixels (the image processor's too: 2 x 2 patches merge into one token)."""
    vocab_size: int = 512
    """Vocabulary size of the tokenizer trained locally on the market's words."""
    image_size: int = 56
    """The tiny PM's image processor takes at most image_size x image_size pixels (a multiple of 28).
    Read for ``policy.tiny`` only: the tiny RM's processor is sized by ``reward.pair_image_size``."""
    seed: int = 0
    """Torch seed of the random initial weights."""


Dtype = Literal["float32", "bfloat16", "float16"]


class Placement(_Strict):
    """Where one process of a role runs: the GPUs and CPUs it asks Ray for, and the dtype its model is
    held in. ``device`` and ``use_gpu`` are derived from ``num_gpus``, never set."""

    num_gpus: float = Field(0.0, ge=0)
    """GPUs each process of the role asks Ray for; > 0 puts its model on cuda (fractions share a GPU
    between actors; a worker group's ranks take whole GPUs, or a fraction when it has one rank), 0 keeps
    it on CPU."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs each process of the role asks Ray for."""
    dtype: Dtype = "float32"
    """Dtype the role's model weights are loaded and run in."""

    @property
    def use_gpu(self) -> bool:
        return self.num_gpus > 0

    @property
    def device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"


class WorkerGroupPlacement(Placement):
    """A group of ranks training one DeepSpeed model (one rank per worker)."""

    num_workers: int = Field(2, ge=1)
    """Ranks (one worker process each, one bundle each in the placement group)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    """How the ranks' bundles are placed: PACK fills a node first (NVLink inside a node); SPREAD /
    STRICT_SPREAD put ranks on different nodes: the PolicyGroup's placement group, and Ray Train's
    ``ScalingConfig`` for ``reward_training`` and ``pretraining``."""

    @model_validator(mode="after")
    def _whole_gpus(self) -> "WorkerGroupPlacement":
        # NCCL refuses two ranks of one group on the same GPU; a single rank may share its GPU with
        # the pools (one-GPU machines: scripts/gpu_check.sh's online round)
        if self.num_gpus not in (0, 1) and not (self.num_workers == 1 and self.num_gpus < 1):
            raise ValueError(f"num_gpus must be 0 or 1 per rank (one GPU per DeepSpeed rank; a fraction only "
                             f"with num_workers 1), got {self.num_gpus} with num_workers {self.num_workers}")
        return self


class ActorPoolConfig(Placement):
    """A Ray Data actor pool (``ActorPoolStrategy(min_size, max_size)``) and what each actor asks for.
    On CPU use fractional ``num_cpus``; ``resources`` are custom Ray resources, e.g. ``{renderer: 1}``
    to land on the cluster's renderer group."""

    min_size: int = Field(1, ge=1)
    """Actors the pool starts with and never shrinks below."""
    max_size: int = Field(1, ge=1)
    """Actors the pool may grow to with the backlog (>= min_size)."""
    num_cpus: float = Field(0.25, gt=0)
    """CPUs each actor of the pool asks Ray for (fractions let several share a core)."""
    resources: dict[str, float] = {}
    """Custom Ray resources each actor asks for, e.g. ``{renderer: 1}`` for the cluster's renderer group."""

    @model_validator(mode="after")
    def _check_sizes(self) -> "ActorPoolConfig":
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} > max_size {self.max_size}")
        return self


class RendererPoolConfig(ActorPoolConfig):
    """A Ray Data actor pool of renderers (``ActorPoolStrategy(min_size, max_size)``) and what each
    asks for, and how ``train`` sizes it in that range (docs/cluster.md, how the renderer pool scales)."""

    sizing: Literal["ray_data", "backlog"] = "ray_data"
    """How ``train`` sizes the pool. ray_data: Ray Data's actor-pool autoscaler, which grows only onto
    nodes the cluster already has and keeps its peak of nodes requested while the job runs. backlog:
    the driver keeps one actor per block fed and not yet consumed (dataplane/elastic.py); pending actors
    make the cluster autoscaler add the backlog's nodes at once, and surplus actors stop after
    ``idle_release_s``, so their nodes go idle. ``generate`` always uses ray_data (no driver in its data path)."""
    idle_release_s: float = Field(5.0, ge=0)
    """With sizing backlog: seconds the pool must have been larger than the backlog needs before its
    surplus actors stop (above the gap between a round's last block and the next round's first --
    last steps, checkpoint, sampling -- keeps the renderers loaded between rounds)."""


class ReplicaPlacement(Placement):
    """Ray Serve replicas (autoscaling between ``min_replicas`` and ``max_replicas``)."""

    min_replicas: int = Field(1, ge=0)
    """Replicas the deployment autoscales down to."""
    max_replicas: int = Field(2, ge=1)
    """Replicas the deployment autoscales up to."""


class ResourcesConfig(_Strict):
    """Every role says here, once, where it runs. Nothing else in the config names a device."""

    policy: WorkerGroupPlacement = WorkerGroupPlacement(num_cpus=0.5)
    """The PolicyGroup ranks that sample and train the policy (``train``)."""
    reward_training: WorkerGroupPlacement = WorkerGroupPlacement()
    """The ``train-rm`` Ray Train workers."""
    pretraining: WorkerGroupPlacement = WorkerGroupPlacement()
    """The ``pretrain-pm`` Ray Train workers."""
    renderers: RendererPoolConfig = RendererPoolConfig(max_size=2)
    """The renderer actor pool; grows with the backlog (``train``, ``generate``)."""
    scorers: ActorPoolConfig = ActorPoolConfig(max_size=1)
    """The frozen RM scorer actor pool (``train``, ``generate``)."""
    generators: ActorPoolConfig = ActorPoolConfig(max_size=1)
    """The policy actors writing descriptions (``generate``)."""
    serve: ReplicaPlacement = ReplicaPlacement()
    """The ``serve`` replicas."""
    driver_models: Placement = Placement()
    """What ``evaluate-rm`` and pretraining's before/after probe load in the driver process (its device
    and dtype); on a cluster submit those jobs with ``--entrypoint-num-gpus`` to match. The driver is
    no Ray task: its ``num_cpus`` is only shown by ``caig-ray config show`` (``--entrypoint-num-cpus``)."""


class LoraConfig(_Strict):
    """Optional LoRA as in CAIG (r=128, alpha=256; vision tower, projector and lm_head frozen)."""

    enabled: bool = False
    """Train a LoRA adapter on the language model instead of every weight; the reference is then the
    policy with its adapter disabled."""
    r: int = Field(128, ge=1)
    """LoRA rank."""
    alpha: int = Field(256, ge=1)
    """LoRA alpha (the adapter's scale is alpha / r)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA path."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Projection names adapted, inside the language model only."""


class PolicyConfig(OptimizerConfig):
    """The prompt model (PM). ``model_path`` None means: the tiny model from ``make-world``."""

    model_path: str | None = None
    """The PM's folder (a local path or an object-store URI); None = the world's tiny model."""
    tiny: TinyBackboneConfig = TinyBackboneConfig()
    """The tiny PM ``make-world`` builds."""
    image_size: int | None = Field(56, ge=28)
    """Product image side in pixels fed to the PM; None = the checkpoint's native input (its processor resizes)."""
    instruction_templates: int = Field(10, ge=1, le=10)
    """CAIG's instruction variety: one of the first k PM templates (``caig_ray/prompts.py``) drawn per
    training product and round, seeded; 1 = always the first. Held-out evaluation always uses the first."""
    max_new_tokens: int = Field(24, ge=1)
    """Most tokens of one generated background description."""
    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature of the descriptions."""
    generate_batch_size: int = Field(16, ge=1)
    """Products per generate call on a rank (bounds the KV cache)."""
    micro_batch_size: int | None = Field(4, ge=1)
    """Sequences (examples) per forward/backward; gradients accumulate to one optimizer step over the
    rank's shard. None = the whole shard in one forward."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more compute)."""
    reference: Literal["replicated", "zero3"] = "replicated"
    """The frozen reference (the pretrained PM) for a full fine-tune: "replicated" = a whole copy per
    rank; "zero3" = a ZeRO-3 inference engine, partitioned like the policy (needs zero_stage 3).
    With LoRA the reference is the policy with its adapter disabled (no copy), whatever this says."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage of the policy's training (PolicyGroup; ranks and devices: resources.policy)."""
    beta: float = Field(0.5, gt=0)
    """DPO / PCPO temperature (CAIG: 0.5)."""
    pcpo_weight: float = Field(1.0, ge=0.0)
    """Weight of the PCPO term: loss = DPO + w * PCPO (CAIG: 1.0; 0 = DPO only)."""
    lora: LoraConfig = LoraConfig()
    """Optional LoRA fine-tuning of the policy."""

    @model_validator(mode="after")
    def _reference_needs_zero3(self) -> "PolicyConfig":
        if self.reference == "zero3" and self.zero_stage != 3:
            raise ValueError(f"reference 'zero3' needs zero_stage 3, got {self.zero_stage}")
        return self


class RewardConfig(_Strict):
    """The reward model (RM): backbone + 2-way last-token head + point-level CTR head."""

    model_path: str | None = None
    """The trained RM (train-rm --out): what train, generate and serve score with unless --rm."""
    backbone_path: str | None = None
    """The folder train-rm starts the RM from (CAIG: the pretrained PM, pretrain-pm --out);
    None = the world's tiny RM."""
    tiny: TinyBackboneConfig = TinyBackboneConfig(seed=1)
    """The tiny RM ``make-world`` builds."""
    pair_image_size: int = Field(56, ge=28)
    """Side in pixels each ad is resized to before the pair is put together."""
    question_templates: int = Field(12, ge=1, le=12)
    """CAIG's question variety in RM training: one of the first k RM templates drawn per pair and epoch,
    seeded; 1 = always the first. Scoring (online, Serve, evaluate-rm) always asks the first."""
    pair_layout: Literal["composite", "two_images"] = "composite"
    """composite: CAIG's one side-by-side image. two_images: the two ads as two images in one prompt
    (the tiny Qwen2-VL cannot learn left-vs-right within one composite; README, reward model)."""
    ctr_loss_weight: float = Field(0.5, ge=0.0)
    """Weight of the point-level CTR regression (MSE) in the RM loss: CE + w * MSE."""


class RendererConfig(_Strict):
    """Which renderer paints backgrounds, and how: procedural, or Stable Diffusion 1.5 ControlNet
    inpainting from local folders (``caig_ray/models/renderer.py``)."""

    kind: Literal["procedural", "diffusers"] = "procedural"
    """procedural: the market's own painter (CPU, instant); diffusers: SD1.5 inpainting + canny ControlNet."""
    sd_path: str | None = None
    """Stable Diffusion 1.5 inpainting folder (a local path or an object-store URI); needed by diffusers."""
    controlnet_path: str | None = None
    """Canny ControlNet folder (a local path or an object-store URI); needed by diffusers."""
    image_size: int = Field(96, ge=32)
    """Side in pixels of the rendered ads (a multiple of 8 for diffusers)."""
    product_fill: float = Field(0.78, gt=0.1, le=1.0)
    """Fraction of the ad side the product is scaled to and centred at."""
    steps: int = Field(30, ge=1)
    """Denoising steps per image (diffusers)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale (diffusers)."""
    controlnet_scale: float = 1.0
    """ControlNet conditioning scale (diffusers)."""
    canny_low: int = 100
    """Low threshold of the canny edges of the product (the ControlNet's control image)."""
    canny_high: int = 200
    """High threshold of the canny edges of the product."""
    mask_dilate: int = Field(20, ge=1)
    """Dilation in pixels of the inpainting mask at 512 px (CAIG: 20x20), scaled with image_size."""
    batch_size: int = Field(4, ge=1)
    """Images per Stable Diffusion pipeline call (diffusers)."""
    scheduler: Literal["euler_ancestral", "euler", "ddim", "pndm", "dpm_solver", "folder"] = "euler_ancestral"
    """Sampler: CAIG renders with Euler-ancestral; the folder's own scheduler is used only with "folder"."""
    variant: str | None = None
    """Weight files variant, e.g. "fp16" for folders holding only *.fp16.safetensors."""
    tiny_sd_size: int = Field(64, ge=32)
    """Image side used with the tiny SD (multiple of 8): the demo's renderer comparison (``caig-ray demo``)."""
    simulated_latency_s: float = Field(0.0, ge=0.0)
    """A benchmark stand-in, not a model setting: each renderer actor waits this many seconds per image
    it renders, as a remote GPU's render time would (bench/pipeline.py). On 2 CPU cores rendering is
    CPU-bound, so only a latency-bound renderer shows what widening the pool buys. 0 = off."""
    channels_last: bool = False
    """Speed option (diffusers): UNet, ControlNet and VAE weights in channels_last memory format, which
    CUDA's tensor-core convolutions prefer; images equal the default's up to float rounding."""
    fuse_qkv: bool = False
    """Speed option (diffusers): one matmul for each attention's q/k/v projections (k/v in cross-attention)
    in the UNet, ControlNet and VAE (diffusers' ``fuse_qkv_projections``); equal up to float rounding."""
    compile: bool = False
    """Speed option (diffusers): ``torch.compile`` the UNet and the ControlNet (full graph, one static
    graph per batch shape; the first render of each shape compiles, minutes); equal up to float rounding."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode with ``compile``: "reduce-overhead" replays CUDA graphs, removing the per-kernel
    launch cost that bounds a batch-1 render on CUDA (ignored on CPU)."""
    generator_device: Literal["cpu", "device"] = "cpu"
    """Where the seeded noise is drawn: "cpu" gives the same images on every device; "device" draws on the
    render device, sparing Euler-ancestral's host draw and blocking host-to-device copy at every step,
    but on CUDA from different random numbers, so different images (on CPU the same)."""

    @model_validator(mode="after")
    def _check_paths(self) -> "RendererConfig":
        if self.kind == "diffusers" and self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 for diffusers, got {self.image_size}")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode {self.compile_mode!r} needs compile: true")
        return self


class DataConfig(_Strict):
    """Where the catalog and click logs are read from (None: the world written by make-world)."""

    catalog: str | None = None
    """The product catalog (catalog.json); None = the world's catalog/catalog.json."""
    click_logs: str | None = None
    """The historical click logs (a Parquet file); None = the world's click_logs.parquet."""


class RMTrainConfig(OptimizerConfig):
    """``train-rm``: Ray Train ``TorchTrainer`` with DeepSpeed ZeRO inside ``train_func``
    (workers and devices: resources.reward_training)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage of RM training."""
    epochs: int = Field(2, ge=1)
    """Passes over the training pairs."""
    batch_size: int = Field(8, ge=1)
    """Pairs per optimizer step, per worker."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate: the tiny RM starts from random weights; CAIG: 2e-5."""
    ctr_target_scale: float = Field(1.0, gt=0)
    """Scale of the CTR head's target: 1.0 = CAIG's raw CTR target; 100 = CTR in percent."""
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    """Fraction of the products whose pairs are held out for evaluate-rm (no product in both splits)."""
    train_band: tuple[float, float] | None = None
    """CTR-ratio band of the *training* pairs; None = the market band (CAIG trains and tests on it).
    Evaluation always uses the market band."""
    max_pairs: int | None = Field(None, ge=2)
    """Cap on training pairs (tests); None = all."""
    max_failures: int = Field(1, ge=0)
    """Times Ray Train restarts the workers after a worker fails (FailureConfig.max_failures)."""
    seed: int = 0
    """Seed of the train/test split, the shuffle, the left/right draw, the question templates and the heads' init."""


class PretrainConfig(OptimizerConfig):
    """``pretrain-pm``: SFT on the three e-commerce tasks (TRL SFTTrainer inside TorchTrainer;
    workers and devices: resources.pretraining)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage of the SFT (0 = no DeepSpeed)."""
    epochs: float = Field(3.0, gt=0)
    """Passes over the SFT examples (fractions allowed)."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate: the tiny PM starts from random weights; CAIG: 2e-5."""
    lr_schedule: LrSchedule = "cosine"
    """constant, or cosine (this role's default): linear warmup over warmup_ratio, then cosine decay to 0."""
    batch_size: int = Field(8, ge=1)
    """Examples per step, per worker."""
    max_examples: int | None = Field(None, ge=2)
    """Cap on SFT examples (tests); None = all."""
    eval_products: int = Field(20, ge=1)
    """Held-out products for the before/after measurement (at most half the catalog)."""
    max_failures: int = Field(1, ge=0)
    """Times Ray Train restarts the workers after a worker fails (FailureConfig.max_failures)."""
    seed: int = 0
    """Seed of the held-out split, the instruction templates drawn and the SFT trainer."""


class PerceptionConfig(_Strict):
    """Perception pretraining of the tiny PM's vision tower in ``make-world`` (``caig_ray/perception.py``):
    on fresh renders of the world (no clicks) the tower learns to recover the rendered attributes --
    the analogue of the pretrained tower a real MLLM starts from. Real checkpoints skip it."""

    train_renders: int = Field(0, ge=0)
    """Rendered ads it trains on (0 = no perception pretraining: the tower keeps its random weights)."""
    probe_renders: int = Field(400, ge=20)
    """Held-out renders of the linear probe (fitted on one half, scored on the other)."""
    epochs: int = Field(3, ge=1)
    """Passes over the training renders."""
    batch_size: int = Field(32, ge=1)
    """Renders per optimizer step."""
    lr: float = Field(2e-3, gt=0)
    """AdamW learning rate of the tower, the projector and the attribute heads."""
    seed: int = 0
    """Seed of the renders (products, descriptions, render seeds) and of the heads' init."""


class FaultConfig(_Strict):
    """Injected faults, for tests only (issue: proof under stress). Each fires once per job: a
    marker file under ``marker_dir`` records that it fired, so a restarted actor does not die again."""

    marker_dir: str | None = None
    """Folder where each fault writes its marker when it fires; needed by every fault."""
    renderer_die_after_batches: int | None = Field(None, ge=1)
    """A renderer process exits after k batches."""
    scorer_die_after_batches: int | None = Field(None, ge=1)
    """A scorer process exits after k batches."""
    driver_kill_after_round: int | None = Field(None, ge=0)
    """The driver SIGKILLs itself after this round's checkpoint."""
    policy_rank_die_at_step: int | None = Field(None, ge=1)
    """The last PolicyWorker process exits in its k-th train step."""
    feed_die_after_blocks: int | None = Field(None, ge=1)
    """The PairFeed actor's process exits when block k+1 is put."""

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
    """Rounds of sample -> render -> score -> train."""
    products_per_round: int = Field(64, ge=2)
    """Training products drawn per round (seeded)."""
    samples_per_product: int = Field(2, ge=2)
    """N descriptions sampled per product (CAIG: 2); the first two samples form the pair."""
    eval_products: int = Field(32, ge=1)
    """Products held out for evaluation: never sampled for training."""
    eval_every: int = Field(1, ge=1)
    """Evaluate after every k rounds (and before the first, and after the last)."""
    eval_samples: int = Field(1, ge=1)
    """Descriptions sampled per held-out product at each evaluation (fixed seeds): the market's
    metrics (true CTR, lift, match, mismatch share) are over all of them, the RM's win rate over the
    first (the others are rendered and judged by the market, not scored by the RM)."""
    pairs_per_batch: int = Field(8, ge=1)
    """Rows per streamed block (the render and score batch)."""
    train_batch_size: int = Field(16, ge=1)
    """Examples per DPO+PCPO step (all ranks together)."""
    max_policy_lag: int = Field(0, ge=0)
    """Rounds the generating weights may lag the trained ones: 0 = CAIG's strict rounds (sample ->
    render -> score -> train); 1 = round r+1 is sampled and rendered while round r trains."""
    pipeline: Literal["streaming", "sequential"] = "streaming"
    """streaming: one job-long Ray Data pipeline, training on the first scored blocks. sequential: CAIG's
    scripts -- sample all, then render all, then score all (each a Ray Data run), then train (bench/pipeline.py)."""
    debias_rm: bool = True
    """Score both orders and average (position-debiased preference)."""
    tie_margin: float | None = Field(0.0, ge=0.0, lt=0.5)
    """A pair whose two ads are identical, or whose RM preference is within tie_margin of 0.5, is a tie:
    skipped and counted (pairs_skipped_tie), never trained as a preference. None = CAIG's scripts'
    rule (p >= 0.5 picks the first sample, ties included)."""
    scorer_batch_size: int = Field(16, ge=1)
    """Pairs per RM forward in the scorer actors (``train`` and ``generate``)."""
    checkpoint_every: int = Field(1, ge=1)
    """Checkpoint the policy every k rounds (and after the last); --resume continues from the last one."""
    keep_checkpoints: int = Field(2, ge=1)
    """Most recent checkpoints kept; older ones are deleted."""
    max_policy_restarts: int = Field(2, ge=0)
    """In-job recovery: a lost PolicyWorker rebuilds the group, reloads the last checkpoint from storage
    and re-feeds the rounds after it, at most this many times."""
    max_feed_restarts: int = Field(2, ge=0)
    """In-job recovery: a lost PairFeed actor rebuilds the pipeline from the last checkpoint, at most
    this many times."""
    seed: int = 0
    """Seed of the held-out split, each round's products, the templates, the sampling and the render seeds."""
    faults: FaultConfig = FaultConfig()
    """Faults injected into the loop's actors and driver."""


class ServeConfig(_Strict):
    """``caig-ray serve``: the live RM scoring endpoint (Ray Serve + FastAPI)."""

    host: str = "127.0.0.1"
    """Address the HTTP proxy listens on (``caig-ray serve``)."""
    port: int = Field(8000, ge=1, le=65535)
    """Port the HTTP proxy listens on."""
    max_batch_size: int = Field(16, ge=1)
    """Requests batched into one RM forward on a replica (Serve's dynamic batching)."""
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    """Seconds a replica waits for a batch to fill before scoring what it has."""
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Autoscaling target: ongoing requests per replica."""
    max_image_bytes: int = Field(4_000_000, ge=1024)
    """Largest image a request may carry, in bytes per decoded image (413 beyond)."""
    max_image_side: int = Field(4096, ge=16)
    """Largest image side in pixels a request may carry (413 beyond)."""
    max_title_chars: int = Field(1000, ge=1)
    """Request limit (413 naming the limit): characters of a product title -- a 100k-character title
    once held a replica for 97 s."""
    max_attributes: int = Field(64, ge=0)
    """Request limit: key-value pairs per product."""
    max_attribute_chars: int = Field(500, ge=1)
    """Request limit: characters per attribute key and per value."""
    max_queued_requests: int = Field(64, ge=1)
    """Requests one replica holds at once (scoring, or waiting for a batch); one more is answered 503
    with Retry-After at once instead of queueing until it times out. Must let a batch fill."""
    api_key_env: str | None = None
    """The name of an environment variable holding the API key (never the key itself): when set, every
    request but GET /healthz must carry it (header checked before any work; 401 otherwise). None = no
    key: the endpoint must then sit behind an authenticating ingress (docs/serving.md)."""

    @model_validator(mode="after")
    def _batches_can_fill(self) -> "ServeConfig":
        if self.max_queued_requests < self.max_batch_size:
            raise ValueError(f"max_queued_requests ({self.max_queued_requests}) is below max_batch_size "
                             f"({self.max_batch_size}): batches could never fill")
        return self


class CaigConfig(_Strict):
    """Top-level config: one block per component."""

    name: str = "caig"
    """A label for this config (each preset names itself); kept in the saved config of a run."""
    seed: int = 0
    """Seed of the tiny Stable Diffusion's weights (make-world) and of the demo's sample picks."""
    storage: str | None = None
    """Where every output of a job lives (caig_ray/storage.py): unset = --out as given; a shared POSIX
    path; or an object-store URI (staged locally, uploaded). --out is relative to it."""
    market: MarketConfig = MarketConfig()
    """The simulated ad market and its hidden click model."""
    policy: PolicyConfig = PolicyConfig()
    """The prompt model (PM) and how it is sampled and trained."""
    reward: RewardConfig = RewardConfig()
    """The reward model (RM)."""
    renderer: RendererConfig = RendererConfig()
    """The background renderer."""
    data: DataConfig = DataConfig()
    """Where the catalog and click logs are read from."""
    train_rm: RMTrainConfig = RMTrainConfig()
    """``train-rm``: RM training."""
    pretrain: PretrainConfig = PretrainConfig()
    """``pretrain-pm``: the PM's e-commerce SFT."""
    perception: PerceptionConfig = PerceptionConfig()
    """``make-world``: perception pretraining of the tiny vision tower (before the PM's SFT)."""
    serve: ServeConfig = ServeConfig()
    """``serve``: the RM scoring endpoint."""
    online: OnlineConfig = OnlineConfig()
    """``train``: the online CTR-driven loop."""
    resources: ResourcesConfig = ResourcesConfig()
    """Where every role runs (GPUs, CPUs, dtype, pool sizes)."""

    @model_validator(mode="after")
    def _backlog_sizing_streams(self) -> "CaigConfig":
        # the sequential pipeline renders each round in a Ray Data run of its own: no job-long pool to size
        if self.resources.renderers.sizing == "backlog" and self.online.pipeline != "streaming":
            raise ValueError("resources.renderers.sizing backlog needs online.pipeline streaming (the sequential "
                             f"pipeline starts a Ray Data pool per round), got {self.online.pipeline!r}")
        return self

    @model_validator(mode="after")
    def _one_ad_geometry(self) -> "CaigConfig":
        # the simulated market painted the click logs' ads at market.ad_image_size / product_fill; the
        # online loop's procedural renderer must paint the same geometry, or the RM scores ads unlike
        # any it learnt from (a diffusion renderer paints at its own size: its images are resized)
        r, m = self.renderer, self.market
        if r.kind == "procedural" and (r.image_size, r.product_fill) != (m.ad_image_size, m.product_fill):
            raise ValueError(f"renderer.image_size/product_fill ({r.image_size}, {r.product_fill}) differ from "
                             f"market.ad_image_size/product_fill ({m.ad_image_size}, {m.product_fill}): the procedural "
                             "renderer paints the market's ads; set both to the same values")
        return self


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
        if sub and isinstance(v, dict):
            # a block the base does not set starts from its parent's default, not the block class's
            # own (resources.renderers: max_size 2, not RendererPoolConfig's 1)
            under = out[k] if isinstance(out.get(k), dict) else _default_block(model, k)
            out[k] = merge_onto(sub, under, v)
        else:
            out[k] = v
    return out


def _default_block(model: type[BaseModel], key: str) -> dict:
    """What the field ``key`` of ``model`` sets in its default block beyond the block class's defaults."""
    default = model.model_fields[key].get_default(call_default_factory=True)
    return default.model_dump(mode="json", exclude_unset=True) if isinstance(default, BaseModel) else {}


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


def config_layers(source: str | Path, preset: str | None = None, _seen: tuple[Path, ...] = ()) -> tuple[str, dict]:
    """(where the config comes from, in words; its raw mapping with every layer merged). A preset is
    one layer on the field defaults. A file names its base in ``base:`` -- a preset, another YAML file
    (relative to this one) or ``none`` (the field defaults: what ``save_config`` writes) -- and holds
    only what differs; ``preset`` (the ``--preset`` flag) is the base of a file that names none, and a
    file whose ``base:`` says otherwise is refused."""
    if str(source) in PRESETS and not Path(str(source)).is_file():
        if preset and preset != str(source):
            raise ConfigError(f"--preset {preset} and preset {source} both given: give one")
        raw = _read_yaml(preset_path(str(source)))
        base = raw.pop("base", None)  # a control world: a preset on another preset, holding what differs
        if base is None:
            return f"preset {source}", merge_onto(CaigConfig, {}, raw)
        where, under = config_layers(base)
        return f"preset {source} on {where}", merge_onto(CaigConfig, under, raw)
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
        return f"{path} (on the field defaults)", merge_onto(CaigConfig, {}, raw)
    if base in PRESETS:
        where, under = config_layers(base)  # a preset may itself be on another preset
    else:
        base_path = (path.parent / base).resolve()
        seen = (*_seen, path.resolve())
        if base_path in seen:
            raise ConfigError(f"{path}: base {base} makes a cycle: {' -> '.join(str(p) for p in (*seen, base_path))}")
        where, under = config_layers(base_path, _seen=seen)
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
