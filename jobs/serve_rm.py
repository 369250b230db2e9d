"""Live RM scoring over HTTP: ``python -m caig_ray.jobs.serve_rm`` / ``caig-ray serve``.

A Ray Serve deployment with a FastAPI ingress around the same ``RewardScorer`` core the pipeline
uses; requests are batched with ``@serve.batch``; replicas autoscale from config.

API: ``POST /v1/score`` (a product and two base64 images -> P(first gets more clicks), the
position-debiased P, the two predicted CTRs), ``POST /v1/rank`` (a product and 2-16 images -> best
first), ``GET /healthz``; the OpenAPI schema is at ``/openapi.json``. Bad input is a 4xx naming the
field and, for a limit, the limit (413 too large, 422 invalid), never a 500; every error body --
FastAPI's and Starlette's own answers too (a body that is not UTF-8 JSON: 422; 404; 405) -- is
``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}``, FastAPI's validation-error shape, and the
OpenAPI document lists every status with that body and declares the serve limits. An image is
decoded in full (a truncated PNG/JPEG is a 422) before anything is scored. A replica
holding ``serve.max_queued_requests`` requests answers the next one 503 with ``Retry-After`` at once.
With ``serve.api_key_env`` set, every request but ``GET /healthz`` and the API's own documents
(``/openapi.json``, ``/docs``, ``/redoc``) must carry ``Authorization: Bearer <key>``, checked before
anything else runs (401 otherwise). The model's forward runs in a worker thread, off the replica's
event loop (health checks stay live). docs/serving.md describes the API, every status and the key.
``caig-ray serve`` stops cleanly on SIGTERM as on Ctrl-C (Serve, and the Ray it started, shut down).
"""

# no `from __future__ import annotations` here: FastAPI resolves the request models from real annotations
import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import os
import struct
import sys
import time
import zlib
from typing import Annotated

from fastapi import FastAPI, HTTPException, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, field_validator
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException

from caig_ray.config import (CaigConfig, ConfigError, ReplicaPlacement, ServeConfig, config_from_dict)
from caig_ray.data.catalog import to_8bit
from caig_ray.models.vlm import check_model_folder
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


ERRORS = {401: {"model": ErrorBody, "description": "no or a wrong API key (only with serve.api_key_env): send "
                                                  "'Authorization: Bearer <key>'",
                "headers": {"WWW-Authenticate": {"description": "Bearer", "required": True,
                                                 "schema": {"type": "string"}}}},
          413: {"model": ErrorBody, "description": "a field over a serve limit (the message names it and the "
                                                  "limit): the maxLength / maxProperties this document declares, "
                                                  "or an image over serve.max_image_bytes / max_image_side"},
          422: {"model": ErrorBody, "description": "invalid input (the location names the field): a body that is "
                                                  "not UTF-8 JSON, a missing or mistyped field, an image that is not "
                                                  "base64, not PNG/JPEG, or not complete"},
          503: {"model": ErrorBody, "description": "the replica is full: retry after the Retry-After seconds",
                "headers": {"Retry-After": {"description": "seconds", "required": True,
                                            "schema": {"type": "string"}}}}}
# Answered for paths and methods the document does not list (so they cannot sit under an operation):
# in components.responses, with the same body, and said in info.description.
OTHER_ANSWERS = {
    "NotFound": {"description": "404: no such path (the paths are the ones this document lists)",
                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}},
    "MethodNotAllowed": {"description": "405: a method the path does not take (the Allow header lists those it "
                                        "does)",
                         "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                         "headers": {"Allow": {"description": "the path's methods", "required": True,
                                               "schema": {"type": "string"}}}}}


def http_error(status: int, loc: list, msg: str, kind: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(status, detail=[{"loc": loc, "msg": msg, "type": kind}], headers=headers)


# The API key (serve.api_key_env). Enforced by the ASGI middleware below, which runs before routing, so
# before FastAPI reads or parses any body: a dependency would run only after the JSON is parsed (an
# unauthenticated `{not json` or 50 MB body would get 422/413, and cost that work, instead of 401).
# The HTTPBearer dependency on the two routes only declares the scheme in the OpenAPI document
# (auto_error=False: it never answers anything itself); `_openapi` drops it, and the 401s, from the
# document of a replica that takes no key, so the document says what the replica does.
BEARER = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                    description="the API key (serve.api_key_env): header 'Authorization: Bearer <key>'")
_OPEN = {("GET", "/healthz")}  # besides the API's own documents (app.openapi_url, docs_url, redoc_url)


def _replica():
    """This replica's ``RewardScorerService`` instance; None outside a replica."""
    try:
        return serve.get_replica_context().servable_object
    except (RayServeException, AttributeError):
        return None


def _replica_api_key() -> bytes | None:
    """The key this replica requires (``RewardScorerService.api_key``), None without one or outside a replica."""
    return getattr(_replica(), "api_key", None)


def _auth_error(missing: bool) -> JSONResponse:
    msg = ("missing API key: send the header 'Authorization: Bearer <key>'" if missing else
           "invalid API key (header 'Authorization: Bearer <key>')")
    body = {"detail": [{"loc": ["header", "Authorization"], "msg": msg,
                        "type": "missing_api_key" if missing else "invalid_api_key"}]}
    # RFC 6750 section 3: no error code when the request carried no credentials at all
    return JSONResponse(status_code=401, content=body,
                        headers={"WWW-Authenticate": "Bearer" if missing else 'Bearer error="invalid_token"'})


class RequireApiKey:
    """ASGI middleware: with a key configured, a request that is not to an open path and does not carry
    ``Authorization: Bearer <key>`` (compared with ``hmac.compare_digest``) is answered 401 before the
    app sees it -- its body is never read."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        key = _replica_api_key() if scope["type"] == "http" else None
        if key is not None and not self._open(scope):
            given = dict(scope.get("headers") or []).get(b"authorization")
            scheme, _, token = (given or b"").strip().partition(b" ")
            if not given or scheme.lower() != b"bearer" or not token.strip():
                await _auth_error(missing=True)(scope, receive, send)
                return
            if not hmac.compare_digest(token.strip(), key):
                await _auth_error(missing=False)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _open(scope) -> bool:
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # under a Serve route_prefix
            path = path[len(root):] or "/"
        docs = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url} - {None}
        return (scope["method"], path) in _OPEN or (scope["method"] in ("GET", "HEAD") and path in docs)


app.add_middleware(RequireApiKey)


DOCUMENT_NOTE = (
    "Every error answer has the ErrorBody shape ({\"detail\": [{\"loc\", \"msg\", \"type\"}]}). Each operation "
    "lists its statuses; a body that is not UTF-8 JSON is its 422 (type json_invalid). A path this document does "
    "not list is 404 (components.responses.NotFound) and a method a path does not take 405 with an Allow header "
    "(MethodNotAllowed); with an API key configured, a request without it is 401 first. The limits are "
    "declared as maxLength / maxProperties: over one is 413. Outside this contract, from Ray Serve itself: a "
    "plain-text 503 while the deployment is unavailable and a plain-text 500 if a replica dies mid-request.")


def max_image_chars(max_image_bytes: int) -> int:
    """The longest base64 text that can decode to ``max_image_bytes`` bytes: a longer one is refused (413)
    before it is decoded; one within it still is when it decodes to more (by 1 or 2 bytes at most)."""
    return 4 * -(-max_image_bytes // 3)


def _declare_limits(schema: dict, cfg: ServeConfig) -> None:
    """This replica's serve limits into the document, as the JSON Schema bounds they are (over one: 413)."""
    models = schema["components"]["schemas"]
    product = models["Product"]["properties"]
    product["title"]["maxLength"] = cfg.max_title_chars
    attrs = next(s for s in product["attributes"]["anyOf"] if s.get("type") == "object")
    attrs["maxProperties"] = cfg.max_attributes
    attrs["propertyNames"] = {"maxLength": cfg.max_attribute_chars}
    attrs["additionalProperties"]["maxLength"] = cfg.max_attribute_chars
    for image in (models["ScoreRequest"]["properties"]["image_a"], models["ScoreRequest"]["properties"]["image_b"],
                  models["RankRequest"]["properties"]["images"]["items"]):
        image["maxLength"] = max_image_chars(cfg.max_image_bytes)
        image["description"] = (image.get("description", "base64 PNG/JPEG of an ad") + f" (at most serve."
                                f"max_image_bytes = {cfg.max_image_bytes} bytes once decoded, sides at most serve."
                                f"max_image_side = {cfg.max_image_side} px: 413 over either)")


def _openapi() -> dict:
    """FastAPI's document, plus this replica's limits and the 404/405 answers; without a key on this
    replica, less the ApiKey scheme and the 401s."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)  # generates and caches app.openapi_schema
        replica = _replica()
        if getattr(replica, "api_key", None) is None:
            schema.get("components", {}).pop("securitySchemes", None)
            for ops in schema["paths"].values():
                for op in ops.values():
                    op.pop("security", None)
                    op.get("responses", {}).pop("401", None)
        if getattr(replica, "cfg", None) is not None:
            _declare_limits(schema, replica.cfg)
        schema["components"]["responses"] = OTHER_ANSWERS
        schema["info"]["description"] = DOCUMENT_NOTE
    return app.openapi_schema


app.openapi = _openapi
AUTH = [Security(BEARER)]


@app.exception_handler(StarletteHTTPException)
async def _http_error(request, exc: StarletteHTTPException) -> JSONResponse:
    """Every HTTP error as ``ErrorBody``. Ours (``http_error``) already carry that detail; FastAPI's and
    Starlette's own carry a string, and get it here: the 400 FastAPI answers for a body it cannot
    parse (not UTF-8, nesting too deep) becomes the 422 of any other invalid JSON; 404 and 405 (its
    Allow header kept) name what was wrong without echoing the path back."""
    headers = dict(exc.headers or {})
    if isinstance(exc.detail, list):
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=headers)
    status = exc.status_code
    if status == 400:  # FastAPI: "There was an error parsing the body"
        status = 422
        item = {"loc": ["body"], "msg": "the body is not valid UTF-8 JSON" if isinstance(exc.__cause__, UnicodeDecodeError)
                else "the body could not be parsed as JSON", "type": "json_invalid"}
    elif status == 404:
        item = {"loc": ["path"], "msg": "no such path (the API's paths are listed in /openapi.json)", "type": "not_found"}
    elif status == 405:
        item = {"loc": ["method"], "msg": f"method not allowed on this path; allowed: {headers.get('Allow', '')}",
                "type": "method_not_allowed"}
    else:
        item = {"loc": [], "msg": str(exc.detail), "type": "http_error"}
    return JSONResponse(status_code=status, content={"detail": [item]}, headers=headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, as ``ErrorBody``: without the offending ``input`` echoed back (a 100k-character
    title, or text that cannot even be encoded as UTF-8, would otherwise come back or fail as a 500)."""
    items = [{"loc": list(e.get("loc", [])), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
             for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": items})


# base64 text (standard alphabet, no data: URI prefix) of a whole PNG or JPEG file
ImageB64 = Annotated[str, Field(min_length=1, json_schema_extra={"contentEncoding": "base64", "format": "byte"})]


class Health(BaseModel):
    status: str = Field(description="'ok'")
    model_path: str
    started_at: float = Field(description="when this replica started (Unix time)")
    requests_held: int = Field(description="requests this replica holds now")


class ScoreRequest(BaseModel):
    product: Product
    image_a: ImageB64 = Field(description="base64 PNG/JPEG of the first ad")
    image_b: ImageB64 = Field(description="base64 PNG/JPEG of the second ad")


class ScoreResponse(BaseModel):
    p_first_better: float
    p_first_better_debiased: float
    ctr_first: float
    ctr_second: float


class RankRequest(BaseModel):
    product: Product
    images: list[ImageB64] = Field(min_length=2, max_length=16, description="2-16 base64 PNG/JPEG ads")


class RankedImage(BaseModel):
    index: int
    win_rate: float  # mean debiased P(this beats the other) over all others
    ctr: float  # mean predicted CTR of this image over its pairs


class RankResponse(BaseModel):
    ranking: list[RankedImage]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type
_ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def png_problem(raw: bytes) -> str | None:
    """Why the PNG file ``raw`` is not whole, or None. Pillow decodes a PNG whose compressed pixel data
    ends early (a file cut after a few rows and closed again) without an error, the missing rows
    black; so here: every chunk complete with its CRC, IHDR first, the IDAT stream complete and
    holding exactly the bytes the header's size, depth, colour type and interlacing need, IEND present.
    Inflating to count costs one more pass over the pixel data, 64 KiB held at a time."""
    pos, header, expected, got = len(PNG_SIGNATURE), None, 0, 0
    stream = zlib.decompressobj()
    while True:
        if pos + 12 > len(raw):
            return "the file ends inside a chunk, before IEND"
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        end = pos + 12 + length
        if end > len(raw):
            return f"the file ends inside the {kind.decode('latin-1')!r} chunk"
        data = raw[pos + 8:end - 4]
        if zlib.crc32(kind + data) != struct.unpack(">I", raw[end - 4:end])[0]:
            return f"the {kind.decode('latin-1')!r} chunk fails its CRC"
        pos = end
        if header is None:
            if kind != b"IHDR" or length != 13:
                return "no IHDR chunk first"
            w, h, depth, colour, _, _, interlace = header = struct.unpack(">IIBBBBB", data)
            if colour not in _PNG_CHANNELS or interlace not in (0, 1):
                return "an invalid IHDR chunk"
            bits = _PNG_CHANNELS[colour] * depth
            passes = _ADAM7 if interlace else [(0, 0, 1, 1)]
            for x0, y0, dx, dy in passes:
                pw, ph = max(0, -(-(w - x0) // dx)), max(0, -(-(h - y0) // dy))
                if pw and ph:
                    expected += ph * (1 + (pw * bits + 7) // 8)  # each row: a filter byte and its pixels
        elif kind == b"IDAT":
            try:
                while not stream.eof and got <= expected:
                    out = stream.decompress(data, 1 << 16)
                    got, data = got + len(out), stream.unconsumed_tail
                    if not data and len(out) < 1 << 16:  # (a full buffer may leave output pending: go on)
                        break
            except zlib.error:
                return "its compressed pixel data is corrupt"
        elif kind == b"IEND":
            break
    if not stream.eof:
        return "its compressed pixel data is cut short"
    if got != expected:
        return (f"its pixel data holds {got} of the {expected} bytes its header needs" if got < expected else
                "its pixel data holds more bytes than its header needs")
    return None


def decode_image(value: str, field: str, max_bytes: int, max_side: int) -> Image.Image:
    """base64 -> RGB image, decoded in full; any failure is an HTTP 4xx naming ``field`` (and the limit,
    for a limit)."""
    loc = ["body", *field.replace("]", "").split("[")]
    loc = [int(x) if x.isdigit() else x for x in loc]
    if value[:5].lower() == "data:":
        raise http_error(422, loc, f"field '{field}': a data: URI; send only the base64 text after its "
                                   "'base64,' (no 'data:image/png;base64,' prefix)", "data_uri")
    if len(value) > max_image_chars(max_bytes):  # refused before decoding anything
        raise http_error(413, loc, f"field '{field}': base64 of {len(value)} characters is over the "
                                   f"{max_image_chars(max_bytes)} that serve.max_image_bytes ({max_bytes}) allows",
                         "too_large")
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
        problem = png_problem(raw) if img.format == "PNG" else None
        if problem:
            raise http_error(422, loc, f"field '{field}': incomplete PNG: {problem}", "image_truncated")
        img.load()  # every pixel: a JPEG cut short raises here ("image file is truncated")
    except Image.DecompressionBombError:  # a header claiming a gigantic size, refused by Pillow before decoding
        raise http_error(413, loc, f"field '{field}': image size over the serve.max_image_side limit of {max_side} px",
                         "too_large") from None
    except (UnidentifiedImageError, SyntaxError, ValueError, OSError) as e:  # (UnidentifiedImageError is an OSError)
        if isinstance(e, OSError) and "truncated" in str(e) and not isinstance(e, UnidentifiedImageError):
            raise http_error(422, loc, f"field '{field}': incomplete image: the file is cut short",
                             "image_truncated") from None
        raise http_error(422, loc, f"field '{field}': not a PNG/JPEG image", "image") from None
    return to_8bit(img).convert("RGB")  # 16-bit grayscale scaled, not clipped to white


@serve.deployment(name="RewardScorerService", health_check_period_s=10)
@serve.ingress(app)
class RewardScorerService:
    def __init__(self, cfg: ServeConfig, placement: ReplicaPlacement, model_path: str):
        from caig_ray.actors.scorer import RewardScorer

        self.cfg = cfg
        self.api_key = None  # bytes when serve.api_key_env is set: RequireApiKey checks every request with it
        if self.cfg.api_key_env is not None:
            # from the runtime_env build_app gave this replica (or the node's own environment)
            key = os.environ.get(self.cfg.api_key_env, "").strip()
            if not key:
                raise RuntimeError(f"serve.api_key_env: the environment variable {self.cfg.api_key_env!r} is not "
                                   "set (or empty) in this replica")
            self.api_key = key.encode()
        where = placement
        self.model_path = model_path
        self.scorer = RewardScorer(model_path, batch_size=self.cfg.max_batch_size, device=where.device,
                                   dtype=where.dtype)
        self._score_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.held = 0  # requests this replica holds now (admitted, not yet answered)
        self.started_at = time.time()

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

    # Why a hand-written counter and not Serve's own `max_queued_requests` deployment option (measured,
    # `python bench/serve_load.py --backpressure`, bench/results/serve_backpressure.json, docs/serving.md):
    # in a burst of 64 against one replica holding 8, Serve's proxy rejects faster (503s p50 126 ms vs
    # 300 ms here: the body never reaches the replica) and, with backpressure_config.retry_after_s, sends
    # Retry-After -- but its body is the plain text "Request dropped due to backpressure (...)"
    # (text/plain), not the ErrorBody JSON this API documents for its 503 and every other error, and
    # Serve (2.60) has no hook to change that body. This counter's 503s all met the contract.
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

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> dict:
        # the model's location without a URI's query (an endpoint, maybe credentials, stay private)
        return {"status": "ok", "model_path": self.model_path.split("?")[0], "started_at": self.started_at,
                "requests_held": self.held}

    @app.post("/v1/score", response_model=ScoreResponse, responses=ERRORS, dependencies=AUTH)
    async def score(self, req: ScoreRequest) -> ScoreResponse:
        async with self._admitted():
            self._check_product(req.product)
            a, b = self._image(req.image_a, "image_a"), self._image(req.image_b, "image_b")
            r = await self._score_batch(PairToScore(a, b, req.product.title, req.product.attributes))
        return ScoreResponse(p_first_better=r["p_left"], p_first_better_debiased=r["p_left_debiased"],
                             ctr_first=r["ctr_left"], ctr_second=r["ctr_right"])

    @app.post("/v1/rank", response_model=RankResponse, responses=ERRORS, dependencies=AUTH)
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


def api_key_env_vars(cfg: ServeConfig) -> dict[str, str]:
    """``{serve.api_key_env: key}`` from this process's environment, for the replicas' runtime_env; ``{}``
    without ``serve.api_key_env``. A variable that is not set, empty, or not a header-safe key is a
    ``ConfigError`` (one line), raised before any replica starts."""
    name = cfg.api_key_env
    if name is None:
        return {}
    value = os.environ.get(name)
    if value is None or not value.strip():
        raise ConfigError(f"serve.api_key_env: the environment variable {name!r} is "
                          f"{'not set' if value is None else 'empty'}; set it to the API key before starting "
                          "the endpoint (the replicas get it from this process)")
    if not all(33 <= ord(c) <= 126 for c in value.strip()):
        raise ConfigError(f"serve.api_key_env: the key in {name!r} must be printable ASCII without spaces "
                          "(it travels in an HTTP header)")
    return {name: value}


def application(full: CaigConfig, **options):
    """The bound Serve application for a resolved config; ``options`` override the deployment options
    (bench/serve_load.py --backpressure uses this to try Serve's own ``max_queued_requests``)."""
    from caig_ray.jobs._entry import with_model_locations

    full = with_model_locations(full)  # a model URI under an object-store storage takes its query
    check_model_folder(full.reward.model_path, "reward.model_path (the trained RM)", kind="reward")
    cfg, where = full.serve, full.resources.serve
    # The API key travels to the replicas in their runtime_env, copied from this (deploying) process.
    # Trade-off: the replicas need nothing set on their nodes and always get the key the deployer checked,
    # but a runtime_env is stored in the cluster's GCS and shown by the Ray dashboard / state API (actor
    # and job details), so anyone who can read the cluster can read the key -- even where the pods already
    # hold it from a Kubernetes Secret (cluster/rayservice.yaml). Keep the dashboard and GCS as closed as
    # the key (Ray token auth, ClusterIP Services), and rotate the key by redeploying.
    from caig_ray.ds import WORKER_ENV

    env_vars = {**WORKER_ENV, **api_key_env_vars(cfg)}
    return RewardScorerService.options(**{
        # a little above the replica's own bound, so the excess reaches it and gets its 503 at once
        # rather than waiting in the proxy's queue
        "max_ongoing_requests": cfg.max_queued_requests + 8,
        "autoscaling_config": {"min_replicas": where.min_replicas, "max_replicas": where.max_replicas,
                               "target_ongoing_requests": cfg.target_ongoing_requests},
        "ray_actor_options": {"num_cpus": where.num_cpus, "num_gpus": where.num_gpus,
                              "runtime_env": {"env_vars": env_vars}},
        **options,
    }).bind(cfg, where, str(full.reward.model_path))


def build_app(args: dict):
    """Application builder (``serve build`` / RayService ``import_path: caig_ray.jobs.serve_rm:build_app``):
    ``args`` is a caig-ray config holding ``reward.model_path`` (the trained RM), the ``serve:`` block
    and ``resources: {serve: ...}`` (where the replicas run); every other block keeps its defaults.
    With ``serve.api_key_env`` set, that variable must hold the key in this process (ConfigError otherwise)."""
    return application(config_from_dict(args, "serve application args"))


from caig_ray.jobs.serve import main  # noqa: E402,F401  (`python -m caig_ray.jobs.serve_rm` as before)


if __name__ == "__main__":
    sys.exit(main())
