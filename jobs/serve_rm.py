"""Live RM scoring over HTTP: ``python -m caig_ray.jobs.serve_rm`` / ``caig-ray serve``.

A Ray Serve deployment with a FastAPI ingress around the same ``RewardScorer`` core the pipeline
uses; requests are batched with ``@serve.batch``; replicas autoscale from config.

API: ``POST /v1/score`` (a product and two base64 images -> P(first gets more clicks), the
position-debiased P, the two predicted CTRs), ``POST /v1/rank`` (a product and 2-16 images -> best
first), ``GET /healthz``; the OpenAPI schema is at ``/openapi.json``. Bad input is a 4xx naming the
field and, for a limit, the limit (413 too large, 422 invalid), never a 500; every error body is
``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}``, FastAPI's validation-error shape. A replica
holding ``serve.max_queued_requests`` requests answers the next one 503 with ``Retry-After`` at once.
The model's forward runs in a worker thread, off the replica's event loop (health checks stay live).
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

import contextlib

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, field_validator
from ray import serve

from caig_ray.config import ConfigError, ReplicaPlacement, ServeConfig, config_from_dict, load_config
from caig_ray.data.catalog import to_8bit
from caig_ray.models.vlm import ModelFolderError, check_model_folder
from caig_ray.scoring import PairToScore, rank_round_robin, round_robin

app = FastAPI(title="caig-ray reward model", version="1")


def _utf8(value):
    """Text must be encodable: JSON can carry an unpaired surrogate escape that no tokenizer takes."""
    for text in ([value] if isinstance(value, str) else list(value or {}) + list((value or {}).values())):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text with an unpaired surrogate (not valid Unicode)") from None
    return value


class Product(BaseModel):
    title: str = Field(min_length=1, description="product title (at most serve.max_title_chars characters)")
    category: str | None = None
    attributes: dict[str, str] | None = Field(None, description="at most serve.max_attributes pairs")

    _valid_text = field_validator("title", "category", "attributes")(_utf8)


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="where: e.g. ['body', 'product', 'title']")
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every error the API answers (and FastAPI's own validation errors) has this shape."""

    detail: list[ErrorItem]


ERRORS = {413: {"model": ErrorBody, "description": "a field over a serve limit (the message names it)"},
          422: {"model": ErrorBody, "description": "invalid input (the location names the field)"},
          503: {"model": ErrorBody, "description": "the replica is full: retry after the Retry-After seconds"}}


def http_error(status: int, loc: list, msg: str, kind: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(status, detail=[{"loc": loc, "msg": msg, "type": kind}], headers=headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, as ``ErrorBody``: without the offending ``input`` echoed back (a 100k-character
    title, or text that cannot even be encoded as UTF-8, would otherwise come back or fail as a 500)."""
    items = [{"loc": list(e.get("loc", [])), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
             for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": items})


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
    """base64 -> RGB image; any failure is an HTTP 4xx naming ``field`` (and the limit, for a limit)."""
    loc = ["body", *field.replace("]", "").split("[")]
    loc = [int(x) if x.isdigit() else x for x in loc]
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise http_error(422, loc, f"field '{field}': not valid base64", "base64") from None
    if len(raw) > max_bytes:
        raise http_error(413, loc, f"field '{field}': image of {len(raw)} bytes is over the serve.max_image_bytes "
                                   f"limit of {max_bytes}", "too_large")
    try:
        img = Image.open(io.BytesIO(raw))
        if img.format not in ("PNG", "JPEG"):
            raise http_error(422, loc, f"field '{field}': {img.format} image; send PNG or JPEG", "image_format")
        if max(img.size) > max_side:  # checked on the header, before any pixel is decoded
            raise http_error(413, loc, f"field '{field}': image side {max(img.size)} px is over the "
                                       f"serve.max_image_side limit of {max_side} px", "too_large")
        img.load()
    except Image.DecompressionBombError:  # a header claiming a gigantic size, refused by Pillow before decoding
        raise http_error(413, loc, f"field '{field}': image size over the serve.max_image_side limit of {max_side} px",
                         "too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise http_error(422, loc, f"field '{field}': not a PNG/JPEG image", "image") from None
    return to_8bit(img).convert("RGB")  # 16-bit grayscale scaled, not clipped to white


@serve.deployment(name="RewardScorerService", health_check_period_s=10)
@serve.ingress(app)
class RewardScorerService:
    def __init__(self, cfg: dict, placement: dict, model_path: str):
        from caig_ray.actors.scorer import RewardScorer

        self.cfg = ServeConfig.model_validate(cfg)
        where = ReplicaPlacement.model_validate(placement)
        self.model_path = model_path
        self.scorer = RewardScorer(model_path, batch_size=self.cfg.max_batch_size, device=where.device,
                                   dtype=where.dtype)
        self._score_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.held = 0  # requests this replica holds now (admitted, not yet answered)
        self.started_at = time.time()

    def check_health(self) -> None:
        if self.scorer is None:
            raise RuntimeError("reward model not loaded")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, pairs: list[PairToScore]) -> list[dict]:
        # the forward in a worker thread: the event loop keeps answering health checks and 503s meanwhile
        res = await asyncio.get_running_loop().run_in_executor(None, self.scorer.score, pairs)
        return [{k: v[i] for k, v in res.items()} for i in range(len(pairs))]

    def _image(self, value: str, field: str) -> Image.Image:
        return decode_image(value, field, self.cfg.max_image_bytes, self.cfg.max_image_side)

    def _check_product(self, product: Product) -> None:
        """The serve limits on the product's text (413 naming the limit)."""
        cfg = self.cfg
        if len(product.title) > cfg.max_title_chars:
            raise http_error(413, ["body", "product", "title"], f"title of {len(product.title)} characters is over "
                             f"the serve.max_title_chars limit of {cfg.max_title_chars}", "too_large")
        attrs = product.attributes or {}
        if len(attrs) > cfg.max_attributes:
            raise http_error(413, ["body", "product", "attributes"], f"{len(attrs)} attributes is over the "
                             f"serve.max_attributes limit of {cfg.max_attributes}", "too_large")
        for key, value in attrs.items():
            if max(len(key), len(value)) > cfg.max_attribute_chars:
                raise http_error(413, ["body", "product", "attributes", key], f"attribute {key[:40]!r} is over the "
                                 f"serve.max_attribute_chars limit of {cfg.max_attribute_chars}", "too_large")

    @contextlib.asynccontextmanager
    async def _admitted(self):
        """Hold one of the replica's ``max_queued_requests`` places, or answer 503 + Retry-After now."""
        if self.held >= self.cfg.max_queued_requests:
            raise http_error(503, ["server"], f"this replica holds {self.held} requests (serve.max_queued_requests); "
                             "retry later", "overloaded", headers={"Retry-After": "1"})
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model_path": self.model_path, "started_at": self.started_at,
                "requests_held": self.held}

    @app.post("/v1/score", response_model=ScoreResponse, responses=ERRORS)
    async def score(self, req: ScoreRequest) -> ScoreResponse:
        async with self._admitted():
            self._check_product(req.product)
            a, b = self._image(req.image_a, "image_a"), self._image(req.image_b, "image_b")
            r = await self._score_batch(PairToScore(a, b, req.product.title, req.product.attributes))
        return ScoreResponse(p_first_better=r["p_left"], p_first_better_debiased=r["p_left_debiased"],
                             ctr_first=r["ctr_left"], ctr_second=r["ctr_right"])

    @app.post("/v1/rank", response_model=RankResponse, responses=ERRORS)
    async def rank(self, req: RankRequest) -> RankResponse:
        async with self._admitted():
            return await self._rank(req)

    async def _rank(self, req: RankRequest) -> RankResponse:
        self._check_product(req.product)
        images = [self._image(v, f"images[{i}]") for i, v in enumerate(req.images)]
        n = len(images)
        res = await asyncio.gather(*[self._score_batch(PairToScore(images[i], images[j], req.product.title,
                                                                   req.product.attributes)) for i, j in round_robin(n)])
        win_rate, ctr, order = rank_round_robin(n, [r["p_left_debiased"] for r in res], [r["ctr_left"] for r in res],
                                                [r["ctr_right"] for r in res])
        return RankResponse(ranking=[RankedImage(index=k, win_rate=win_rate[k], ctr=ctr[k]) for k in order])


def build_app(args: dict):
    """Application builder (``serve build`` / RayService ``import_path: caig_ray.jobs.serve_rm:build_app``):
    ``args`` is a caig-ray config holding ``reward.model_path`` (the trained RM), the ``serve:`` block
    and ``resources: {serve: ...}`` (where the replicas run); every other block keeps its defaults."""
    full = config_from_dict(args, "serve application args")
    check_model_folder(full.reward.model_path, "reward.model_path (the trained RM)", kind="reward")
    cfg, where = full.serve, full.resources.serve
    return RewardScorerService.options(
        # a little above the replica's own bound, so the excess reaches it and gets its 503 at once
        # rather than waiting in the proxy's queue
        max_ongoing_requests=cfg.max_queued_requests + 8,
        autoscaling_config={"min_replicas": where.min_replicas, "max_replicas": where.max_replicas,
                            "target_ongoing_requests": cfg.target_ongoing_requests},
        ray_actor_options={"num_cpus": where.num_cpus, "num_gpus": where.num_gpus,
                           "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}}},
    ).bind(cfg.model_dump(mode="json"), where.model_dump(mode="json"), str(full.reward.model_path))


def main(argv: list[str] | None = None) -> int:
    from caig_ray.jobs._ray import init_ray

    p = argparse.ArgumentParser(prog="caig-ray serve", description=__doc__)
    p.add_argument("--preset", default="quick")
    p.add_argument("--config", default=None)
    p.add_argument("--rm", default=None, help="trained RM folder (overrides reward.model_path)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    over = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    try:
        full = load_config(args.config or args.preset, overrides={**({"serve": over} if over else {}),
                                                                  **({"reward": {"model_path": args.rm}} if args.rm else {})})
        check_model_folder(full.reward.model_path, "reward.model_path (--rm)", kind="reward")
    except (ConfigError, ModelFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = full.serve
    init_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app({"reward": {"model_path": full.reward.model_path}, "serve": cfg.model_dump(mode="json"),
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
