"""`POST /generate` and the operational routes over a real socket: answers, validation, request ids,
CORS, API keys, rate limits, quotas, `/usage` and the static web app."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from proxy_harness import MODEL_ID, SENTINEL, RunningProxy

from sdclient.testing import InferenceTestServer, Reply

ORIGIN = "http://localhost:5173"
ADMIN_KEY = "admin-key-0123456789abcdef"
API_KEY = "client-key-0123456789abcdef"


def test_image_answer_has_bytes_seed_and_timings(proxy: RunningProxy, upstream: InferenceTestServer) -> None:
    upstream.default = Reply.image(format="png", compute_time=0.25)
    with proxy.client() as client:
        response = client.post(
            "/generate", json={"prompt": "a red fox", "width": 128, "height": 96, "seed": 42}
        )
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (128, 96)
    assert response.headers["x-seed"] == "42"
    assert float(response.headers["x-compute-time"]) == pytest.approx(0.25)
    assert float(response.headers["x-total-time"]) > 0
    assert response.headers["x-cold-start-wait"] == "0.000"
    assert response.headers["x-cache"] == "miss"
    sent = upstream.requests[0].json
    assert sent == {"inputs": "a red fox", "parameters": {"width": 128, "height": 96, "seed": 42}}


def test_json_answer_with_accept_application_json(proxy: RunningProxy, upstream: InferenceTestServer) -> None:
    with proxy.client() as client:
        response = client.post(
            "/generate",
            json={
                "prompt": "a red fox",
                "negative_prompt": "blurry",
                "num_inference_steps": 4,
                "guidance_scale": 2,
            },
            headers={"Accept": "application/json", "X-Request-ID": "page-123"},
        )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"image", "content_type", "seed", "timings", "request_id"}
    assert body["content_type"] == "image/jpeg"
    assert Image.open(io.BytesIO(base64.b64decode(body["image"]))).format == "JPEG"
    assert body["request_id"] == "page-123" == response.headers["x-request-id"]
    assert set(body["timings"]) == {"total_s", "compute_s", "cold_start_wait_s", "request_s"}
    # Without a seed the client draws one, sends it, and the page gets it back.
    assert upstream.requests[0].json["parameters"]["seed"] == body["seed"]
    assert upstream.requests[0].json["parameters"]["negative_prompt"] == "blurry"


INVALID_BODIES: list[tuple[dict[str, object], str]] = [
    ({"prompt": "x", "width": 513}, "width"),
    ({"prompt": "x", "height": 2048}, "height"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 151}, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": 31}, "guidance_scale"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": 2**32}, "seed"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"negative_prompt": "x"}, "prompt"),
    ({"prompt": "x", "steps": 20}, "steps"),
    ({"prompt": "x", "width": "512"}, "width"),
    ({"prompt": "x", "seed": True}, "seed"),
]


def test_invalid_body_is_422_naming_the_field(proxy: RunningProxy, upstream: InferenceTestServer) -> None:
    with proxy.client() as client:
        for body, field in INVALID_BODIES:
            response = client.post("/generate", json=body)
            assert response.status_code == 422, body
            error = response.json()["error"]
            assert error["code"] == "validation_error"
            assert error["message"].startswith(f"{field}: "), (body, error["message"])
    assert upstream.requests == []


def test_body_that_is_not_json_is_422(proxy: RunningProxy) -> None:
    with proxy.client() as client:
        response = client.post(
            "/generate", content=b"{not json", headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 422
    assert "not valid JSON" in response.json()["error"]["message"]


def test_too_large_body_is_413(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(max_body_bytes=2048)
    with proxy.client() as client:
        declared = client.post("/generate", json={"prompt": "x" * 4000})

        def chunks() -> object:
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 500
            yield b'"}'

        streamed = client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
        assert "2048 bytes" in response.json()["error"]["message"]


def test_request_id_on_every_answer_and_only_sane_ones_are_kept(proxy: RunningProxy) -> None:
    with proxy.client() as client:
        kept = client.get("/healthz", headers={"X-Request-ID": "abc-123.x:y"})
        replaced = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
        missing = client.get("/no/such/path")
        long = client.get("/healthz", headers={"X-Request-ID": "a" * 200})
    assert kept.headers["x-request-id"] == "abc-123.x:y"
    assert len(replaced.headers["x-request-id"]) == 32 and " " not in replaced.headers["x-request-id"]
    assert len(long.headers["x-request-id"]) == 32
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert missing.headers["x-request-id"]


def test_method_not_allowed_uses_the_error_shape(proxy: RunningProxy) -> None:
    with proxy.client() as client:
        response = client.get("/generate")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_cors_preflight_allowed_for_a_configured_origin(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(allowed_origins=[ORIGIN])
    with proxy.client() as client:
        preflight = client.options(
            "/generate",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        answer = client.post("/generate", json={"prompt": "a fox", "seed": 1}, headers={"Origin": ORIGIN})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in preflight.headers
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    exposed = {h.strip().lower() for h in answer.headers["access-control-expose-headers"].split(",")}
    assert {
        "x-seed",
        "x-compute-time",
        "x-total-time",
        "x-cold-start-wait",
        "x-request-id",
        "retry-after",
    } <= exposed


def test_cors_preflight_refused_for_another_origin(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(allowed_origins=[ORIGIN])
    with proxy.client() as client:
        preflight = client.options(
            "/generate", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        simple = client.post(
            "/generate", json={"prompt": "a fox"}, headers={"Origin": "https://evil.example"}
        )
    assert preflight.status_code == 400
    assert preflight.json()["error"]["code"] == "cors_refused"
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in simple.headers  # the browser will not hand it to the page


def test_no_cors_headers_when_no_origin_is_configured(proxy: RunningProxy) -> None:
    with proxy.client() as client:
        preflight = client.options(
            "/generate", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
        )
    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.status_code == 405


def test_rate_limit_is_429_with_retry_after(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(rate_limit_per_minute=6, rate_limit_burst=2)
    with proxy.client() as client:
        answers = [client.post("/generate", json={"prompt": f"fox {i}"}) for i in range(3)]
        other_client = client.post(
            "/generate", json={"prompt": "fox"}, headers={"X-Forwarded-For": "10.1.2.3"}
        )
    assert [a.status_code for a in answers] == [200, 200, 429]
    error = answers[2].json()["error"]
    assert error["code"] == "rate_limited"
    assert 1 <= error["retry_after"] <= 10
    assert answers[2].headers["retry-after"] == str(error["retry_after"])
    # X-Forwarded-For from an untrusted peer changes nothing: still the same client.
    assert other_client.status_code == 429


def test_trusted_proxy_forwarded_for_separates_clients(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(rate_limit_per_minute=6, rate_limit_burst=1, trusted_proxies=["127.0.0.1/32"])
    with proxy.client() as client:
        first = client.post("/generate", json={"prompt": "fox"}, headers={"X-Forwarded-For": "203.0.113.7"})
        again = client.post("/generate", json={"prompt": "fox"}, headers={"X-Forwarded-For": "203.0.113.7"})
        # A client-supplied address in front of the real one does not help: read from the right.
        spoofed = client.post(
            "/generate", json={"prompt": "fox"}, headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
        )
        other = client.post("/generate", json={"prompt": "fox"}, headers={"X-Forwarded-For": "203.0.113.8"})
    assert [first.status_code, again.status_code, spoofed.status_code, other.status_code] == [
        200,
        429,
        429,
        200,
    ]


def test_daily_quota_is_429_quota_exceeded_and_failures_do_not_count(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.enqueue(Reply.error(400, "bad parameters"))
    proxy = start_proxy(daily_quota=2)
    with proxy.client() as client:
        failed = client.post("/generate", json={"prompt": "fox"})
        answers = [client.post("/generate", json={"prompt": f"fox {i}"}) for i in range(3)]
    assert failed.status_code == 502
    assert [a.status_code for a in answers] == [200, 200, 429]
    error = answers[2].json()["error"]
    assert error["code"] == "quota_exceeded"
    assert 1 <= error["retry_after"] <= 86_400
    assert "midnight UTC" in error["message"]


def test_api_keys_are_required_when_configured(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(api_keys=[API_KEY], rate_limit_per_minute=60, rate_limit_burst=1)
    with proxy.client() as client:
        missing = client.post("/generate", json={"prompt": "fox"})
        wrong = client.post("/generate", json={"prompt": "fox"}, headers={"X-API-Key": "nope" * 5})
        bearer = client.post(
            "/generate", json={"prompt": "fox"}, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        header = client.post("/generate", json={"prompt": "fox"}, headers={"X-API-Key": API_KEY})
        status = client.get("/status")
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    assert bearer.status_code == 200
    assert header.status_code == 429  # the same key is the same client, whatever its IP
    assert status.status_code == 200  # reading the model's state needs no key
    assert API_KEY not in missing.text + wrong.text + bearer.text + header.text


def test_usage_needs_the_admin_key_and_counts_per_client(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(admin_key=ADMIN_KEY)
    with proxy.client() as client:
        client.post("/generate", json={"prompt": "fox", "seed": 1})
        client.post("/generate", json={"prompt": "fox", "seed": 1})
        client.post("/generate", json={"prompt": "fox", "width": 7})
        no_key = client.get("/usage")
        wrong = client.get("/usage", headers={"X-Admin-Key": "x" * 20})
        usage = client.get("/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert no_key.status_code == wrong.status_code == 401
    assert usage.status_code == 200
    report = usage.json()
    # The invalid request counts as a request (it was rate limited like any other), not as an image.
    assert report["clients"]["ip:127.0.0.1"] == {"requests": 3, "images": 2}
    assert report["upstream"]["total"]["images"] == 1  # the repeat came from the cache
    assert report["cache"]["hits"] == 1
    assert report["queue"]["upstream_calls"] == 1
    assert ADMIN_KEY not in usage.text


def test_usage_is_disabled_without_an_admin_key(proxy: RunningProxy) -> None:
    with proxy.client() as client:
        response = client.get("/usage", headers={"Authorization": "Bearer anything-at-all-here"})
    assert response.status_code == 404
    assert "SDPROXY_ADMIN_KEY" in response.json()["error"]["message"]


def test_status_health_and_readiness(proxy: RunningProxy) -> None:
    with proxy.client() as client:
        before = client.get("/status").json()
        client.post("/generate", json={"prompt": "fox"})
        after = client.get("/status").json()
        health = client.get("/healthz")
        ready = client.get("/readyz")
    assert before == {"state": "unknown", "eta_s": None, "message": None}
    assert after["state"] == "ready"
    assert health.json() == {"status": "ok", "model_state": None}
    assert ready.json() == {"status": "ready", "model_state": "ready"}


def test_static_web_app_is_served_at_app_and_never_answers_api_methods(
    start_proxy: Callable[..., RunningProxy], tmp_path: Path
) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<!doctype html><title>studio</title>")
    (tmp_path / "site" / "app.js").write_text("console.log('hi')")
    proxy = start_proxy(static_dir=tmp_path / "site", allowed_origins=[ORIGIN])
    with proxy.client() as client:
        root = client.get("/")
        page = client.get("/app/")
        script = client.get("/app/app.js")
        preflight = client.options(
            "/generate", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
        )
        generated = client.post("/generate", json={"prompt": "fox"})
        post_to_static = client.post("/app/", json={"prompt": "fox"})
    assert root.status_code in (302, 307) and root.headers["location"] == "/app/"
    assert "studio" in page.text and page.headers["content-type"].startswith("text/html")
    assert script.status_code == 200
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    assert generated.status_code == 200
    assert post_to_static.status_code == 405


def test_upstream_sees_the_model_url_and_the_token(
    proxy: RunningProxy, upstream: InferenceTestServer
) -> None:
    with proxy.client() as client:
        client.post("/generate", json={"prompt": "fox"})
    assert upstream.requests[0].path == f"/models/{MODEL_ID}"
    assert upstream.requests[0].headers["authorization"] == f"Bearer {SENTINEL}"


def test_warm_up_wakes_a_cold_model_before_the_first_visitor(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.cold_start(0.5)
    proxy = start_proxy(warmup=True, max_wait_for_model=5)
    deadline = time.monotonic() + 5
    with proxy.client() as client:
        while client.get("/status").json()["state"] != "ready":
            assert time.monotonic() < deadline, "the warm-up did not finish"
            time.sleep(0.05)
    sent = [r.json for r in upstream.requests if r.method == "POST"]
    assert sent[0] == {
        "inputs": "warm-up",
        "parameters": {"width": 64, "height": 64, "num_inference_steps": 1, "seed": 0},
    }
    assert upstream.requests_while_loading >= 1
