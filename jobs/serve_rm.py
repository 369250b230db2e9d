"""Live RM scoring over HTTP: ``python -m jobs.serve_rm`` / ``caig-ray serve``.

A Ray Serve deployment with a FastAPI ingress around the same ``RewardScorer`` core the pipeline
uses; requests are batched with ``@serve.batch``; replicas autoscale from config.

API: ``POST /v1/score`` (a product and two base64 images -> P(first gets more clicks), the
position-debiased P, the two predicted CTRs), ``POST /v1/rank`` (a product and 2-16 images -> best
first), ``GET /healthz``; the OpenAPI schema is at ``/openapi.json``. Bad input is a 4xx naming the
field, never a 500.
"""

# no `from __future__ import annotations` here: FastAPI resolves the request models from real annotations
import argparse
import asyncio
import base64
import binascii
import io
import os
import sys
import time

from fastapi import FastAPI, HTTPException
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from ray import serve

from caig_ray.config import ConfigError, ReplicaPlacement, ServeConfig, config_from_dict, load_config
from caig_ray.models.vlm import ModelFolderError, check_model_folder
from caig_ray.scoring import PairToScore

app = FastAPI(title="caig-ray reward model", version="1")


class Product(BaseModel):
    title: str = Field(min_length=1, description="product title")
    category: str | None = None
    attributes: dict[str, str] | None = None


class ScoreRequest(BaseModel):
    product: Product
    image_a: str = Field(description="base64 PNG/JPEG of the first ad")
    image_b: str = Field(description="base64 PNG/JPEG of the second ad")


class ScoreResponse(BaseModel):
    p_first_better: float
    p_first_better_debiased: float
    ctr_first: float
    ctr_second: float


class RankRequest(BaseModel):
    product: Product
    images: list[str] = Field(min_length=2, max_length=16, description="2-16 base64 PNG/JPEG ads")


class RankedImage(BaseModel):
    index: int
    win_rate: float  # mean debiased P(this beats the other) over all others
    ctr: float  # mean predicted CTR of this image over its pairs


class RankResponse(BaseModel):
    ranking: list[RankedImage]


def decode_image(value: str, field: str, max_bytes: int, max_side: int) -> Image.Image:
    """base64 -> RGB image; any failure is an HTTP 4xx naming ``field``."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"field '{field}': not valid base64") from None
    if len(raw) > max_bytes:
        raise HTTPException(413, f"field '{field}': image of {len(raw)} bytes is over the {max_bytes}-byte limit")
    try:
        img = Image.open(io.BytesIO(raw))
        if img.format not in ("PNG", "JPEG"):
            raise HTTPException(422, f"field '{field}': {img.format} image; send PNG or JPEG")
        if max(img.size) > max_side:
            raise HTTPException(413, f"field '{field}': image side {max(img.size)} px is over the {max_side} px limit")
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError):
        raise HTTPException(422, f"field '{field}': not a PNG/JPEG image") from None
    return img.convert("RGB")


@serve.deployment(name="RewardScorerService", health_check_period_s=10)
@serve.ingress(app)
class RewardScorerService:
    def __init__(self, cfg: dict, placement: dict):
        from actors.scorer import RewardScorer

        self.cfg = ServeConfig.model_validate(cfg)
        where = ReplicaPlacement.model_validate(placement)
        if not self.cfg.model_path:
            raise ValueError("serve.model_path is not set: point it at a trained RM folder")
        self.scorer = RewardScorer(self.cfg.model_path, batch_size=self.cfg.max_batch_size, device=where.device,
                                   dtype=where.dtype)
        self._score_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    def check_health(self) -> None:
        if self.scorer is None:
            raise RuntimeError("reward model not loaded")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, pairs: list[PairToScore]) -> list[dict]:
        res = self.scorer.score(pairs)
        return [{k: v[i] for k, v in res.items()} for i in range(len(pairs))]

    def _image(self, value: str, field: str) -> Image.Image:
        return decode_image(value, field, self.cfg.max_image_bytes, self.cfg.max_image_side)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model_path": self.cfg.model_path}

    @app.post("/v1/score", response_model=ScoreResponse)
    async def score(self, req: ScoreRequest) -> ScoreResponse:
        a, b = self._image(req.image_a, "image_a"), self._image(req.image_b, "image_b")
        r = await self._score_batch(PairToScore(a, b, req.product.title, req.product.attributes))
        return ScoreResponse(p_first_better=r["p_left"], p_first_better_debiased=r["p_left_debiased"],
                             ctr_first=r["ctr_left"], ctr_second=r["ctr_right"])

    @app.post("/v1/rank", response_model=RankResponse)
    async def rank(self, req: RankRequest) -> RankResponse:
        images = [self._image(v, f"images[{i}]") for i, v in enumerate(req.images)]
        n = len(images)
        idx = [(i, j) for i in range(n) for j in range(i + 1, n)]
        res = await asyncio.gather(*[self._score_batch(PairToScore(images[i], images[j], req.product.title,
                                                                   req.product.attributes)) for i, j in idx])
        wins, ctr = [0.0] * n, [0.0] * n
        for (i, j), r in zip(idx, res):
            wins[i] += r["p_left_debiased"]
            wins[j] += 1 - r["p_left_debiased"]
            ctr[i] += r["ctr_left"]
            ctr[j] += r["ctr_right"]
        ranked = sorted(range(n), key=lambda k: -wins[k])
        return RankResponse(ranking=[RankedImage(index=k, win_rate=wins[k] / (n - 1), ctr=ctr[k] / (n - 1))
                                     for k in ranked])


def build_app(args: dict):
    """Application builder (``serve build`` / RayService ``import_path: jobs.serve_rm:build_app``):
    ``args`` is a caig-ray config holding the ``serve:`` block and ``resources: {serve: ...}`` (where
    the replicas run); every other block keeps its defaults."""
    full = config_from_dict(args, "serve application args")
    cfg, where = full.serve, full.resources.serve
    return RewardScorerService.options(
        autoscaling_config={"min_replicas": where.min_replicas, "max_replicas": where.max_replicas,
                            "target_ongoing_requests": cfg.target_ongoing_requests},
        ray_actor_options={"num_cpus": where.num_cpus, "num_gpus": where.num_gpus,
                           "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}}},
    ).bind(cfg.model_dump(mode="json"), where.model_dump(mode="json"))


def main(argv: list[str] | None = None) -> int:
    from jobs._ray import init_ray

    p = argparse.ArgumentParser(prog="caig-ray serve", description=__doc__)
    p.add_argument("--preset", default="quick")
    p.add_argument("--config", default=None)
    p.add_argument("--rm", default=None, help="trained RM folder (overrides serve.model_path)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    over = {k: v for k, v in {"model_path": args.rm, "host": args.host, "port": args.port}.items() if v is not None}
    try:
        full = load_config(args.config or args.preset, overrides={"serve": over} if over else None)
        check_model_folder(full.serve.model_path, "serve.model_path (--rm)", kind="reward")
    except (ConfigError, ModelFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = full.serve
    init_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app({"serve": cfg.model_dump(mode="json"),
                         "resources": {"serve": full.resources.serve.model_dump(mode="json")}}),
              name="caig-rm", route_prefix="/")
    print(f"serving on http://{cfg.host}:{cfg.port} (POST /v1/score, /v1/rank; GET /healthz; /docs). Ctrl-C stops.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
