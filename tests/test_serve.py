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

    from jobs.serve_rm import build_app

    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"serve": {"model_path": str(quick_world.reward), "max_batch_size": 8, "max_image_bytes": 50_000},
                         "resources": {"serve": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5}}}),
              name="caig-rm", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_http_scores_equal_reward_scorer(endpoint, quick_world):
    from actors.scorer import RewardScorer

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
    ]
    with httpx.Client(timeout=60) as client:
        for path, body, status, field in cases:
            r = client.post(f"{endpoint}{path}", json=body)
            assert r.status_code == status, (path, field, r.status_code, r.text)
            assert field in r.text, (field, r.text)
        r = client.post(f"{endpoint}/v1/score", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        assert client.get(f"{endpoint}/healthz").status_code == 200
