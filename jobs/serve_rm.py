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
import contextlib
import hmac
import os
import sys
import time

from fastapi import FastAPI, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from PIL import Image
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException

from caig_ray.config import CaigConfig, ConfigError, ReplicaPlacement, ServeConfig, config_from_dict
from caig_ray.models.folders import check_model_folder
from caig_ray.scoring import PairToScore, rank_round_robin, round_robin
from caig_ray.serve_api import (DOCUMENT_NOTE, ERRORS, OTHER_ANSWERS, Health, RankedImage, RankRequest,
                                RankResponse, ScoreRequest, ScoreResponse, check_product, decode_image,
                                declare_limits, http_error, http_error_body, validation_error_body)

app = FastAPI(title="caig-ray reward model", version="1")


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
            declare_limits(schema, replica.cfg)
        schema["components"]["responses"] = OTHER_ANSWERS
        schema["info"]["description"] = DOCUMENT_NOTE
    return app.openapi_schema


app.openapi = _openapi
AUTH = [Security(BEARER)]


app.add_exception_handler(StarletteHTTPException, http_error_body)
app.add_exception_handler(RequestValidationError, validation_error_body)


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
            check_product(req.product, self.cfg)
            a, b = self._image(req.image_a, "image_a"), self._image(req.image_b, "image_b")
            r = await self._score_batch(PairToScore(a, b, req.product.title, req.product.attributes))
        return ScoreResponse(p_first_better=r["p_left"], p_first_better_debiased=r["p_left_debiased"],
                             ctr_first=r["ctr_left"], ctr_second=r["ctr_right"])

    @app.post("/v1/rank", response_model=RankResponse, responses=ERRORS, dependencies=AUTH)
    async def rank(self, req: RankRequest) -> RankResponse:
        async with self._admitted():
            return await self._rank(req)

    async def _rank(self, req: RankRequest) -> RankResponse:
        check_product(req.product, self.cfg)
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
