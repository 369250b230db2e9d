"""The live scoring endpoint on 127.0.0.1: real HTTP, scores equal RewardScorer's, bad input is a 4xx."""

import base64
import io
import socket

import httpx
import numpy as np
import pytest
import ray
from chain_checks import job_lines
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


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_caig_ray_serve_stops_cleanly_on_sigterm(quick_world, tmp_path):
    """`caig-ray serve` (a subprocess, with its own private local Ray: RAY_ADDRESS unset, its own
    RAY_TMPDIR) serves /healthz, then on SIGTERM shuts Serve and its Ray down, says so in one line on
    stderr and exits 0 -- no traceback, no fatal-signal dump, and none of its Ray processes left."""
    import importlib.util
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("ray_cleanup", Path(__file__).with_name("ray_cleanup.py"))
    ray_cleanup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ray_cleanup)
    ray_dir = tempfile.mkdtemp(prefix="caig-sigterm-", dir="/tmp")  # short: Ray's socket paths live below it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_dir, PYTHONUNBUFFERED="1")
    port = _free_port()
    cli = Path(sys.executable).with_name("caig-ray")
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([str(cli), "serve", "--preset", "quick", "--rm", str(quick_world.reward), "--port",
                                 str(port)], stdout=o, stderr=e, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (proc.returncode, out.read_text(), err.read_text())
            assert time.monotonic() < deadline, ("no /healthz in 90 s", out.read_text(), err.read_text())
            try:  # up: /healthz answers and the job has said so (serve.run returned)
                if (httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
                        and "serving on http://127.0.0.1:" in out.read_text()):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert "Ctrl-C or SIGTERM stops." in out.read_text()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=45)
        stdout, stderr = out.read_text(), err.read_text()
        assert rc == 0, (rc, stdout, stderr)
        line = "caig-ray serve: SIGTERM received: stopped Serve and the local Ray instance it started; exiting"
        assert stderr.splitlines().count(line) == 1, stderr
        assert stderr.count("SIGTERM") == 1, stderr
        for bad in ("Traceback", "Fatal"):
            assert bad not in stdout + stderr, (bad, stdout, stderr)
        deadline = time.monotonic() + 15
        while ray_cleanup.own_ray_processes(ray_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not ray_cleanup.own_ray_processes(ray_dir), [p.info for p in ray_cleanup.own_ray_processes(ray_dir)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ray_cleanup.stop_own_ray(ray_dir)
        shutil.rmtree(ray_dir, ignore_errors=True)


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


def _error_body(schema: dict, r, status: int) -> dict:
    """``r`` is ``status`` with a JSON body matching the document's ``ErrorBody``; returns its one item."""
    import jsonschema

    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/json", r.headers
    jsonschema.validate(r.json(), _resolved(schema, {"$ref": "#/components/schemas/ErrorBody"}))
    [item] = r.json()["detail"]
    return item


def _truncated_png(width: int = 4000, height: int = 4000, rows: int = 4) -> bytes:
    """A PNG whose header says ``width`` x ``height`` but whose (well-formed, closed) pixel data stops
    after ``rows`` rows: every chunk whole, CRCs right, IEND present -- Pillow decodes it without an
    error, the missing rows black."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = (np.arange(width * 3) % 251).astype(np.uint8).tobytes()
    pixels = zlib.compress(b"".join(b"\x00" + row for _ in range(rows)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_document_declares_images_and_limits_and_bodies_are_utf8_json(endpoint):
    """The image fields declare minLength, maxLength (from serve.max_image_bytes) and their encoding;
    the text limits are in the document as the bounds they are; "" is a 422 naming the field; a body
    with a byte that is not UTF-8 inside a JSON string is the documented 422, not FastAPI's 400."""
    ok = _b64(_ads(1)[0])
    with httpx.Client(timeout=60) as client:
        schema = client.get(f"{endpoint}/openapi.json").json()
        models = schema["components"]["schemas"]
        images = [models["ScoreRequest"]["properties"]["image_a"], models["ScoreRequest"]["properties"]["image_b"],
                  models["RankRequest"]["properties"]["images"]["items"]]
        for image in images:
            assert image["type"] == "string" and image["minLength"] == 1, image
            assert image["contentEncoding"] == "base64" and image["format"] == "byte", image
            assert image["maxLength"] == 4 * -(-50_000 // 3), image  # serve.max_image_bytes 50000 here
        product = models["Product"]["properties"]
        assert product["title"]["minLength"] == 1 and product["title"]["maxLength"] == 300
        attrs = product["attributes"]["anyOf"][0]
        assert attrs["maxProperties"] == 4 and attrs["additionalProperties"]["maxLength"] == 500
        assert attrs["propertyNames"] == {"maxLength": 500}

        for body, path, loc in [({"product": {"title": "t"}, "image_a": "", "image_b": ok}, "/v1/score",
                                 ["body", "image_a"]),
                                ({"product": {"title": "t"}, "image_a": ok, "image_b": ""}, "/v1/score",
                                 ["body", "image_b"]),
                                ({"product": {"title": "t"}, "images": [ok, ""]}, "/v1/rank", ["body", "images", 1])]:
            r = client.post(f"{endpoint}{path}", json=body)
            _assert_documented(schema, path, r)
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc, r.text

        raw = b'{"product": {"title": "caf\xe9"}, "image_a": "' + ok.encode() + b'", "image_b": "' + ok.encode() + b'"}'
        for path in ("/v1/score", "/v1/rank"):
            r = client.post(f"{endpoint}{path}", content=raw, headers={"content-type": "application/json"})
            _assert_documented(schema, path, r)
            assert _error_body(schema, r, 422) == {"loc": ["body"], "msg": "the body is not valid UTF-8 JSON",
                                                   "type": "json_invalid"}
        r = client.post(f"{endpoint}/v1/score", content=b"[" * 100_000, headers={"content-type": "application/json"})
        _assert_documented(schema, "/v1/score", r)  # nested past the parser's depth: the same 422
        assert r.json()["detail"][0]["type"] == "json_invalid"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_truncated_images_and_data_uris_are_refused_naming_the_field(endpoint):
    """An image is decoded in full before anything is scored: a 4000x4000 PNG whose pixel data stops
    after 4 rows (which Pillow decodes without an error, the rest black), a PNG or JPEG file cut short,
    are 422 naming the field; a data: URI is refused naming the data: URI and what to send instead."""
    from PIL import Image as PILImage

    ad = _ads(1)[0]
    ok = _b64(ad)
    png = base64.b64decode(ok)
    jpeg = base64.b64decode(_b64(ad, "JPEG"))
    short = _truncated_png()
    assert len(short) < 50_000
    img = PILImage.open(io.BytesIO(short))
    img.load()  # what made it a black image with a score: Pillow takes it
    assert img.size == (4000, 4000)
    with httpx.Client(timeout=60) as client:
        schema = client.get(f"{endpoint}/openapi.json").json()
        cases = [("/v1/score", "image_a", short, "incomplete PNG: its pixel data holds 48004 of the 48004000 bytes"),
                 ("/v1/score", "image_b", png[:len(png) // 2], "incomplete PNG"),
                 ("/v1/score", "image_a", png[:-12], "incomplete PNG"),  # no IEND
                 ("/v1/score", "image_b", jpeg[:len(jpeg) // 2], "incomplete image: the file is cut short"),
                 ("/v1/rank", "images[1]", short, "incomplete PNG")]
        for path, field, data, msg in cases:
            b64 = base64.b64encode(data).decode()
            if path == "/v1/score":
                body = {"product": {"title": "t"}, "image_a": ok, "image_b": ok, field: b64}
            else:
                body = {"product": {"title": "t"}, "images": [ok, b64]}
            r = client.post(f"{endpoint}{path}", json=body)
            _assert_documented(schema, path, r)
            assert r.status_code == 422, (field, msg, r.text)
            [item] = r.json()["detail"]
            loc = ["body", "images", 1] if field == "images[1]" else ["body", field]
            assert item["loc"] == loc and item["type"] == "image_truncated", item
            assert item["msg"].startswith(f"field '{field}': {msg}"), item

        r = client.post(f"{endpoint}/v1/score", json={"product": {"title": "t"}, "image_a": ok,
                                                      "image_b": "data:image/png;base64," + ok})
        _assert_documented(schema, "/v1/score", r)
        assert r.status_code == 422 and r.json()["detail"] == [
            {"loc": ["body", "image_b"], "type": "data_uri", "msg": "field 'image_b': a data: URI; send only the "
             "base64 text after its 'base64,' (no 'data:image/png;base64,' prefix)"}], r.text
        r = client.post(f"{endpoint}/v1/rank", json={"product": {"title": "t"}, "images": [ok, "DATA:image/jpeg;base64,x"]})
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "data_uri", r.text
        # the whole image (and the plain base64) still scores
        r = client.post(f"{endpoint}/v1/score", json={"product": {"title": "t"}, "image_a": ok, "image_b": ok})
        assert r.status_code == 200, r.text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_unknown_paths_and_methods_get_the_documented_error_body(endpoint):
    """404 and 405 have the ErrorBody shape (documented in components.responses), 405 with its Allow."""
    with httpx.Client(timeout=60) as client:
        schema = client.get(f"{endpoint}/openapi.json").json()
        responses = schema["components"]["responses"]
        for name in ("NotFound", "MethodNotAllowed"):
            assert responses[name]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
        assert responses["MethodNotAllowed"]["headers"]["Allow"]["required"] is True
        for method, path in [("GET", "/nope"), ("POST", "/v1/scores"), ("GET", "/v1/score/x")]:
            item = _error_body(schema, client.request(method, f"{endpoint}{path}"), 404)
            assert item["loc"] == ["path"] and item["type"] == "not_found", item
        for method, path, allow in [("GET", "/v1/score", "POST"), ("PUT", "/v1/rank", "POST"),
                                    ("DELETE", "/v1/score", "POST"), ("POST", "/healthz", "GET")]:
            r = client.request(method, f"{endpoint}{path}")
            item = _error_body(schema, r, 405)
            assert r.headers["allow"] == allow and item == {
                "loc": ["method"], "msg": f"method not allowed on this path; allowed: {allow}",
                "type": "method_not_allowed"}, (r.headers, item)


def _fuzz_images() -> list[str]:
    """Real ads, varied: PNG in every mode the API takes (16-bit grayscale included) and JPEG."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    gray16 = Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16))  # mode I;16
    return [_b64(rgb), _b64(rgb, "JPEG"), _b64(rgb.convert("L")), _b64(rgb.convert("RGBA")),
            _b64(rgb.convert("P")), _b64(gray16), _b64(rgb.convert("L"), "JPEG"), _b64(_ads(1)[0])]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_schemathesis_with_every_check_finds_nothing(endpoint):
    """schemathesis's own engine -- what `schemathesis run URL --checks all --mode all
    --phases examples,coverage,fuzzing,stateful --max-examples 50 --generation-deterministic` runs --
    against the live endpoint's /openapi.json. Every check: no 5xx; every status documented for its
    operation; bodies, content types and headers matching the document; schema-valid requests
    accepted (2xx); schema-violating ones rejected (4xx; 413 counts: it is the documented answer
    over a declared maxLength / maxProperties); undocumented methods 405 with Allow. The one thing
    JSON Schema cannot say -- "base64 of a whole PNG or JPEG" -- is given to schemathesis as the
    strategy for the images' `format: byte`, so valid requests carry real images; invalid ones
    still break the image fields every way the schema allows (wrong type, "", too long, not base64)."""
    import collections

    import schemathesis
    from hypothesis import strategies as st
    from schemathesis.engine import events

    schemathesis.openapi.format("byte", st.sampled_from(_fuzz_images()))
    try:
        schema = schemathesis.openapi.from_url(f"{endpoint}/openapi.json")
        config = schema.config
        config.checks.update(included_check_names=["all"])
        negative = config.checks.negative_data_rejection
        negative.expected_statuses = [*negative.expected_statuses, "413"]
        config.generation.update(modes=["positive", "negative"], max_examples=50, deterministic=True)
        config.phases.update(phases=["examples", "coverage", "fuzzing", "stateful"])
        config.update(request_timeout=60)
        statuses, failures, errors = collections.Counter(), [], []
        for event in schemathesis.engine.from_schema(schema).execute():
            if isinstance(event, events.ScenarioFinished):
                for interaction in event.recorder.interactions.values():
                    if interaction.response is not None:
                        key = (interaction.request.method, interaction.response.status_code, event.phase.value)
                        statuses[key] += 1
                for checks in event.recorder.checks.values():
                    failures += [f"{c.name}: {c.failure_info.failure}"[:800] for c in checks if c.failure_info]
            elif isinstance(event, (events.NonFatalError, events.FatalError)):
                errors.append(repr(event)[:800])
            elif isinstance(event, events.EngineFinished):
                failures += [str(f)[:800] for f in event.failures]
    finally:
        from schemathesis.specs.openapi.formats import unregister_string_format

        unregister_string_format("byte")
    print("schemathesis: (method, status, phase) -> requests:", dict(sorted(statuses.items())))
    assert not errors, errors
    assert not failures, "\n\n".join(sorted(set(failures)))
    codes = {code for _, code, _ in statuses}
    assert 200 in codes and 422 in codes and 405 in codes, statuses  # valid, invalid and method probes all ran
    assert sum(n for (_, code, _), n in statuses.items() if code == 200) >= 10, statuses
    with httpx.Client(timeout=60) as client:
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
    err = job_lines(capsys.readouterr().err)  # a replica of an earlier test may log late on this Ray
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
