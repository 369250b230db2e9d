"""The live scoring endpoint on 127.0.0.1: real HTTP, scores equal RewardScorer's, bad input is a 4xx."""

import base64
import io
import socket

import httpx
import numpy as np
import pytest
import ray
from PIL import Image

from caig_ray.scoring import PairToScore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _ads(n):
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def endpoint(quick_world):
    from ray import serve

    from caig_ray.jobs.serve_rm import build_app

    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"reward": {"model_path": str(quick_world.reward)}, "serve": {"max_batch_size": 8, "max_image_bytes": 50_000,
                                   "max_title_chars": 300, "max_attributes": 4, "max_queued_requests": 8},
                         "resources": {"serve": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5}}}),
              name="caig-rm", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_http_scores_equal_reward_scorer(endpoint, quick_world):
    from caig_ray.actors.scorer import RewardScorer

    ads = _ads(4)
    product = {"title": "red lipstick", "attributes": {"color": "red"}}
    with httpx.Client(timeout=60) as client:
        assert client.get(f"{endpoint}/healthz").json()["status"] == "ok"
        assert "/v1/score" in client.get(f"{endpoint}/openapi.json").json()["paths"]
        got = [client.post(f"{endpoint}/v1/score", json={"product": product, "image_a": _b64(a), "image_b": _b64(b)})
               for a, b in [(ads[0], ads[1]), (ads[2], ads[3])]]
        rank = client.post(f"{endpoint}/v1/rank", json={"product": product, "images": [_b64(a) for a in ads[:3]]})
    assert all(r.status_code == 200 for r in got), [r.text for r in got]
    local = RewardScorer(str(quick_world.reward)).score(
        [PairToScore(ads[0], ads[1], "red lipstick", {"color": "red"}),
         PairToScore(ads[2], ads[3], "red lipstick", {"color": "red"})])
    for i, r in enumerate(got):
        body = r.json()
        assert body["p_first_better"] == pytest.approx(local["p_left"][i], abs=1e-5)
        assert body["p_first_better_debiased"] == pytest.approx(local["p_left_debiased"][i], abs=1e-5)
        assert body["ctr_first"] == pytest.approx(local["ctr_left"][i], abs=1e-5)
    assert rank.status_code == 200
    ranking = rank.json()["ranking"]
    assert sorted(x["index"] for x in ranking) == [0, 1, 2]
    assert [x["win_rate"] for x in ranking] == sorted((x["win_rate"] for x in ranking), reverse=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_requests_are_4xx_naming_the_field(endpoint):
    ok = _b64(_ads(1)[0])
    big = _b64(Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)))
    gif = _b64(_ads(1)[0], "GIF")
    product = {"title": "shoe"}
    cases = [
        ("/v1/score", {"product": product, "image_a": "@@not-base64@@", "image_b": ok}, 422, "image_a"),
        ("/v1/score", {"product": product, "image_a": ok, "image_b": base64.b64encode(b"hello").decode()}, 422, "image_b"),
        ("/v1/score", {"product": product, "image_a": ok, "image_b": gif}, 422, "image_b"),
        ("/v1/score", {"product": product, "image_a": big, "image_b": ok}, 413, "image_a"),
        ("/v1/score", {"product": product, "image_a": ok}, 422, "image_b"),
        ("/v1/score", {"image_a": ok, "image_b": ok}, 422, "product"),
        ("/v1/score", {"product": {"title": ""}, "image_a": ok, "image_b": ok}, 422, "title"),
        ("/v1/rank", {"product": product, "images": [ok]}, 422, "images"),
        ("/v1/rank", {"product": product, "images": [ok] * 17}, 422, "images"),
        ("/v1/rank", {"product": product, "images": [ok, "x!"]}, 422, "images[1]"),
        ("/v1/score", {"product": {"title": "x" * 301}, "image_a": ok, "image_b": ok}, 413, "max_title_chars"),
        ("/v1/score", {"product": {"title": "t", "attributes": {f"k{i}": "v" for i in range(5)}},
                       "image_a": ok, "image_b": ok}, 413, "max_attributes"),
        ("/v1/score", {"product": {"title": "t", "attributes": {"color": "y" * 600}}, "image_a": ok, "image_b": ok},
         413, "max_attribute_chars"),
    ]
    with httpx.Client(timeout=60) as client:
        schema = client.get(f"{endpoint}/openapi.json").json()
        for path, body, status, field in cases:
            r = client.post(f"{endpoint}{path}", json=body)
            assert r.status_code == status, (path, field, r.status_code, r.text)
            assert field in r.text, (field, r.text)
            _assert_documented(schema, path, r)
        r = client.post(f"{endpoint}/v1/score", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        _assert_documented(schema, "/v1/score", r)
        # an unpaired surrogate escape in JSON: refused as 422 naming the field, not a 500
        raw = b'{"product": {"title": "a\\ud800b"}, "image_a": "' + ok.encode() + b'", "image_b": "' + ok.encode() + b'"}'
        r = client.post(f"{endpoint}/v1/score", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "title" in r.text, r.text
        _assert_documented(schema, "/v1/score", r)
        assert client.get(f"{endpoint}/healthz").status_code == 200


def _resolved(schema: dict, node):
    """``node`` with every ``$ref`` into ``components`` inlined (the API's schemas are not recursive)."""
    if isinstance(node, dict):
        if "$ref" in node:
            return _resolved(schema, schema["components"]["schemas"][node["$ref"].split("/")[-1]])
        return {k: _resolved(schema, v) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolved(schema, v) for v in node]
    return node


def _assert_documented(schema: dict, path: str, r) -> None:
    """The status is one the OpenAPI document lists for ``path`` and the body matches its schema."""
    import jsonschema

    responses = schema["paths"][path]["post"]["responses"]
    assert str(r.status_code) in responses, (path, r.status_code, r.text[:300])
    body_schema = responses[str(r.status_code)]["content"]["application/json"]["schema"]
    jsonschema.validate(r.json(), _resolved(schema, body_schema))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_burst_gets_503_with_retry_after_and_normal_requests_keep_working(endpoint):
    """64 requests at once -- long titles and big images mixed with normal ones -- against a replica
    that holds 8: the excess is answered 503 + Retry-After at once, nothing else is 5xx, and the
    replica (same start time) answers normal requests right after."""
    import asyncio

    ok = _b64(_ads(1)[0])
    big = _b64(Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 120, 3), dtype=np.uint8)))
    bodies = []
    for i in range(64):
        title = "long title " * 25 if i % 3 == 0 else "red shoe"  # 275 characters: under the 300 limit
        bodies.append({"product": {"title": title}, "image_a": big if i % 4 == 0 else ok, "image_b": ok})

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[client.post(f"{endpoint}/v1/score", json=b) for b in bodies])

    with httpx.Client(timeout=60) as client:
        before = client.get(f"{endpoint}/healthz").json()["started_at"]
        schema = client.get(f"{endpoint}/openapi.json").json()
    replies = asyncio.run(burst())
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 413, 503}, codes
    assert codes.count(200) >= 8 and codes.count(503) >= 1, codes
    for r in replies:
        _assert_documented(schema, "/v1/score", r)
        if r.status_code == 503:
            assert r.headers.get("retry-after") == "1" and "max_queued_requests" in r.text
    with httpx.Client(timeout=60) as client:
        normal = [client.post(f"{endpoint}/v1/score", json=bodies[1]) for _ in range(5)]
        assert [r.status_code for r in normal] == [200] * 5
        health = client.get(f"{endpoint}/healthz").json()
    assert health["started_at"] == before and health["requests_held"] == 0  # never restarted, nothing stuck


def _strategy(schema: dict, node: dict, images: list[str]):
    """A hypothesis strategy for ``node`` of the OpenAPI document: every value its schema allows
    (strings short), and for the base64-image fields a valid image half of the time."""
    from hypothesis import strategies as st

    node = _resolved(schema, node)
    if "anyOf" in node:
        return st.one_of([_strategy(schema, n, images) for n in node["anyOf"]])
    kind = node.get("type")
    if kind == "object":
        if "properties" not in node:
            return st.dictionaries(st.text(max_size=8), _strategy(schema, node.get("additionalProperties", {}), images),
                                   max_size=6)
        required = set(node.get("required", []))
        props = {k: _strategy(schema, v, images) for k, v in node["properties"].items()}
        return st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                     optional={k: v for k, v in props.items() if k not in required})
    if kind == "array":
        return st.lists(_strategy(schema, node["items"], images), min_size=node.get("minItems", 0),
                        max_size=min(node.get("maxItems", 4), 4) if node.get("minItems", 0) <= 4 else node["minItems"])
    if kind == "string":
        text = st.text(min_size=node.get("minLength", 0), max_size=40)
        return st.one_of(text, st.sampled_from(images)) if "base64" in node.get("description", "") else text
    if kind == "null":
        return st.none()
    return st.one_of(st.none(), st.integers(), st.booleans(), st.text(max_size=5))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fuzzed_requests_from_the_openapi_schema_get_documented_answers(endpoint):
    """Requests generated from the endpoint's own OpenAPI document (hypothesis, bounded, seeded) and
    some that ignore it: never a 5xx, every status documented, every body matching its schema, and
    /healthz green afterwards."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    with httpx.Client(timeout=60) as client:
        schema = client.get(f"{endpoint}/openapi.json").json()
        images = [_b64(a) for a in _ads(2)] + [_b64(_ads(1)[0], "JPEG")]
        for path in ("/v1/score", "/v1/rank"):
            body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
            anything = st.one_of(_strategy(schema, body, images), st.none(), st.integers(), st.text(max_size=20),
                                 st.lists(st.integers(), max_size=3))

            @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(anything)
            def check(payload):
                r = client.post(f"{endpoint}{path}", json=payload)
                assert r.status_code < 500, (payload, r.status_code, r.text[:300])
                _assert_documented(schema, path, r)

            check()
        assert client.get(f"{endpoint}/healthz").json()["status"] == "ok"


KEY_ENV, KEY = "CAIG_TEST_SERVE_KEY", "test-key-0123456789abcdef"


def test_an_api_key_env_that_is_not_set_is_refused_before_anything_starts(quick_world, tmp_path, monkeypatch, capsys):
    """build_app and `caig-ray serve` refuse a serve.api_key_env naming an unset or empty variable, in
    one line, before Ray (let alone a replica) starts."""
    import caig_ray.jobs._ray
    from caig_ray.config import ConfigError
    from caig_ray.jobs.serve_rm import build_app, main

    args = {"reward": {"model_path": str(quick_world.reward)}, "serve": {"api_key_env": "CAIG_TEST_UNSET_KEY"}}
    monkeypatch.delenv("CAIG_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"^serve.api_key_env: the environment variable 'CAIG_TEST_UNSET_KEY' is "
                                          r"not set; set it to the API key"):
        build_app(args)
    monkeypatch.setenv("CAIG_TEST_UNSET_KEY", "  ")
    with pytest.raises(ConfigError, match="'CAIG_TEST_UNSET_KEY' is empty"):
        build_app(args)
    monkeypatch.setenv("CAIG_TEST_UNSET_KEY", "two words")
    with pytest.raises(ConfigError, match="printable ASCII"):
        build_app(args)
    monkeypatch.delenv("CAIG_TEST_UNSET_KEY")

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(caig_ray.jobs._ray, "init_ray", no_ray)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("base: quick\nserve:\n  api_key_env: CAIG_TEST_UNSET_KEY\n")
    assert main(["--config", str(cfg), "--rm", str(quick_world.reward)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"caig-ray serve: config {cfg} on preset quick"  # the job's first line names its config
    assert err[1:] == ["error: serve.api_key_env: the environment variable 'CAIG_TEST_UNSET_KEY' is not set; set it to "
                   "the API key before starting the endpoint (the replicas get it from this process)"], err


@pytest.fixture(scope="module")
def keyed_endpoint(endpoint, quick_world):
    """A second application in the same Serve instance, under /keyed, with serve.api_key_env set. The
    variable exists only in this (deploying) process while build_app runs: the Ray workers were started
    before it, so the replica can only have it from the runtime_env build_app gives it."""
    from ray import serve

    from caig_ray.jobs.serve_rm import build_app

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)
        app = build_app({"reward": {"model_path": str(quick_world.reward)},
                         "serve": {"max_batch_size": 8, "max_image_bytes": 50_000, "max_queued_requests": 8,
                                   "api_key_env": KEY_ENV},
                         "resources": {"serve": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5}}})
    serve.run(app, name="caig-rm-keyed", route_prefix="/keyed")
    yield f"{endpoint}/keyed"
    serve.delete("caig-rm-keyed")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_api_key_is_checked_before_any_work(keyed_endpoint, endpoint):
    """With serve.api_key_env: no key or a wrong one is 401 (documented body, WWW-Authenticate: Bearer),
    even for a body that would be 413 or 422 -- the key is checked before the body is read; the right
    key is served; /healthz and the API's documents need none; the document lists 401 and the scheme.
    Without a key configured (the other app) the document has neither."""
    ok = _b64(_ads(1)[0])
    big = _b64(Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)))
    score = {"product": {"title": "red shoe"}, "image_a": ok, "image_b": ok}
    rank = {"product": {"title": "red shoe"}, "images": [ok, ok]}
    too_large = {"product": {"title": "red shoe"}, "image_a": big, "image_b": ok}
    not_json = b"{not json" + b" x" * 4_000_000  # 8 MB of invalid JSON
    bearer = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=60) as client:
        health = client.get(f"{keyed_endpoint}/healthz")
        assert health.status_code == 200 and health.json()["requests_held"] == 0
        assert client.get(f"{keyed_endpoint}/docs").status_code == 200
        doc = client.get(f"{keyed_endpoint}/openapi.json")
        assert doc.status_code == 200
        schema = doc.json()
        assert schema["components"]["securitySchemes"]["ApiKey"] == {
            "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["ApiKey"]["description"]}
        for path in ("/v1/score", "/v1/rank"):
            op = schema["paths"][path]["post"]
            assert "401" in op["responses"] and op["security"] == [{"ApiKey": []}], op

        def refused(r, path, missing=True):
            assert r.status_code == 401, (path, r.status_code, r.text[:300])
            assert r.headers["www-authenticate"] == ("Bearer" if missing else 'Bearer error="invalid_token"')
            _assert_documented(schema, path, r)
            assert r.json()["detail"][0]["loc"] == ["header", "Authorization"]

        refused(client.post(f"{keyed_endpoint}/v1/score", json=score), "/v1/score")
        refused(client.post(f"{keyed_endpoint}/v1/rank", json=rank), "/v1/rank")
        refused(client.post(f"{keyed_endpoint}/v1/score", json=too_large), "/v1/score")
        refused(client.post(f"{keyed_endpoint}/v1/score", content=not_json,
                            headers={"content-type": "application/json"}), "/v1/score")
        refused(client.post(f"{keyed_endpoint}/v1/score", json=score, headers={"X-API-Key": KEY}), "/v1/score")
        refused(client.post(f"{keyed_endpoint}/v1/score", json=score, headers={"Authorization": f"Basic {KEY}"}),
                "/v1/score")
        refused(client.post(f"{keyed_endpoint}/v1/score", json=score, headers={"Authorization": "Bearer wrong"}),
                "/v1/score", missing=False)
        refused(client.post(f"{keyed_endpoint}/v1/score", json=too_large, headers={"Authorization": f"Bearer {KEY}x"}),
                "/v1/score", missing=False)
        assert client.get(f"{keyed_endpoint}/healthz").json()["requests_held"] == 0

        r = client.post(f"{keyed_endpoint}/v1/score", json=score, headers=bearer)
        assert r.status_code == 200 and set(r.json()) >= {"p_first_better", "ctr_first"}, r.text
        r = client.post(f"{keyed_endpoint}/v1/rank", json=rank, headers={"Authorization": f"bearer {KEY}"})
        assert r.status_code == 200 and len(r.json()["ranking"]) == 2, r.text
        # with the key, the same bodies get their own answers
        assert client.post(f"{keyed_endpoint}/v1/score", json=too_large, headers=bearer).status_code == 413
        assert client.post(f"{keyed_endpoint}/v1/score", content=b"{not json", headers={
            **bearer, "content-type": "application/json"}).status_code == 422

        # the app without a key: no 401 and no scheme in its document, and a key sent anyway is ignored
        plain = client.get(f"{endpoint}/openapi.json").json()
        assert "securitySchemes" not in plain.get("components", {})
        assert all("401" not in plain["paths"][p]["post"]["responses"] and "security" not in plain["paths"][p]["post"]
                   for p in ("/v1/score", "/v1/rank"))
        assert client.post(f"{endpoint}/v1/score", json=score, headers=bearer).status_code == 200
