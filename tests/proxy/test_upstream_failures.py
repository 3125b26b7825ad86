"""Every failure of the text-to-image protocol as a web page sees it through the proxy.

The proxy runs under uvicorn on a real socket in front of `sdclient.testing`'s server; the
`start_proxy` fixture fails any test whose answers or log lines contain the token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from proxy_harness import SENTINEL, RunningProxy

from sdclient.testing import InferenceTestServer, Reply

BODY = {"prompt": "a lighthouse at dusk", "seed": 7}


def test_token_is_sent_upstream_but_never_back(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy()
    with proxy.client() as client:
        response = client.post("/generate", json=BODY)
    assert response.status_code == 200
    # The token does reach the model server (so the leak checks of these tests mean something).
    assert upstream.requests[0].headers["authorization"] == f"Bearer {SENTINEL}"


def test_cold_start_shorter_than_the_wait_answers_the_image(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.cold_start(1.0)
    proxy = start_proxy(max_wait_for_model=10)
    with proxy.client() as client:
        response = client.post("/generate", json=BODY)
        status = client.get("/status").json()
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert 0.5 < float(response.headers["x-cold-start-wait"]) < 5
    assert status["state"] == "ready"


def test_cold_start_longer_than_the_wait_is_503_model_loading(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.cold_start(30.0)
    proxy = start_proxy(max_wait_for_model=1.0)
    with proxy.client() as client:
        response = client.post("/generate", json=BODY)
        status = client.get("/status").json()
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_loading"
    assert 20 <= error["retry_after"] <= 30
    assert response.headers["retry-after"] == str(error["retry_after"])
    assert "loading" in error["message"]
    assert status["state"] == "loading" and 20 <= status["eta_s"] <= 30


FAILURES: list[tuple[str, list[Reply], dict[str, Any], int, str, int]] = [
    # id, upstream replies, proxy settings, status, code, upstream requests
    ("429", [Reply.rate_limited(retry_after=7)], {"max_retries": 0}, 429, "rate_limited", 1),
    ("401", [Reply.error(401, "Invalid credentials in Authorization header")], {}, 502, "upstream_auth", 1),
    ("403", [Reply.error(403, "This token is read-only")], {}, 502, "upstream_auth", 1),
    ("404", [Reply.error(404, "Model test/model does not exist")], {}, 502, "upstream_not_found", 1),
    ("410", [Reply.error(410, "no longer supported, use the router")], {}, 502, "upstream_not_found", 1),
    (
        "402",
        [Reply.error(402, "You have exceeded your monthly included credits")],
        {},
        502,
        "upstream_credits",
        1,
    ),
    ("400", [Reply.error(400, "width must be a multiple of 64")], {}, 502, "upstream_rejected", 1),
    ("422", [Reply.error(422, "guidance_scale: bad value")], {}, 502, "upstream_rejected", 1),
    ("500", [Reply.error(500, "unknown error")] * 2, {}, 502, "upstream_error", 2),
    ("502-html", [Reply.html(status=502)] * 2, {}, 502, "upstream_error", 2),
    ("504-html", [Reply.html(status=504)] * 2, {}, 502, "upstream_error", 2),
    ("503-html", [Reply.html(status=503)] * 2, {}, 502, "upstream_error", 2),
    ("hang", [Reply.hang()], {"max_retries": 0, "upstream_timeout": 0.5}, 504, "upstream_timeout", 1),
    ("not-image", [Reply.not_image()], {}, 502, "upstream_error", 1),
    ("truncated", [Reply.truncated()] * 2, {}, 502, "upstream_error", 2),
    ("reset", [Reply.reset()] * 2, {}, 502, "upstream_error", 2),
]


@pytest.mark.parametrize(
    ("replies", "settings", "status", "code", "sent"),
    [pytest.param(*row[1:], id=row[0]) for row in FAILURES],
)
def test_upstream_failure_reaches_the_page_as_one_error_shape(
    start_proxy: Callable[..., RunningProxy],
    upstream: InferenceTestServer,
    replies: list[Reply],
    settings: dict[str, Any],
    status: int,
    code: str,
    sent: int,
) -> None:
    upstream.enqueue(*replies)
    proxy = start_proxy(**settings)
    with proxy.client() as client:
        response = client.post("/generate", json=BODY)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert response.headers["x-request-id"]
    assert len([r for r in upstream.requests if r.method == "POST"]) == sent
    if status in (429, 503):
        assert int(response.headers["retry-after"]) == error["retry_after"] >= 1
    else:
        assert "retry-after" not in response.headers


def test_upstream_429_retry_after_is_passed_on(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.enqueue(Reply.rate_limited(retry_after=7))
    proxy = start_proxy(max_retries=0)
    with proxy.client() as client:
        response = client.post("/generate", json=BODY)
    assert response.json()["error"]["retry_after"] == 7
    assert response.headers["retry-after"] == "7"


def test_upstream_auth_message_speaks_to_the_operator_and_status_turns_unavailable(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.enqueue(Reply.error(401, "Invalid credentials in Authorization header"))
    proxy = start_proxy()
    with proxy.client() as client:
        error = client.post("/generate", json=BODY).json()["error"]
        status = client.get("/status").json()
    assert "HF_TOKEN" in error["message"] and "401" in error["message"]
    assert status["state"] == "unavailable"


def test_a_model_server_that_echoes_the_token_does_not_leak_it(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.enqueue(Reply.error(400, f"bad header 'Authorization: Bearer {SENTINEL}'"))
    proxy = start_proxy()
    with proxy.client() as client:
        response = client.post("/generate", json=BODY)
        status = client.get("/status")
    assert response.json()["error"]["code"] == "upstream_rejected"
    assert "***" in response.json()["error"]["message"]
    assert SENTINEL not in response.text + status.text  # the fixture checks every answer and log line too
