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
