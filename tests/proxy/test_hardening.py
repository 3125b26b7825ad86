"""What a public deployment relies on: one visitor's request is one upstream job, requests over
the cost budget are refused before anything is sent, the public never sees the upstream's URL or
text, redirects stay on the proxy's own origin, the cache's bound counts every entry, and a broken
usage database is reported instead of crashing.

Over real sockets: the proxy under uvicorn in front of `sdclient.testing`'s server.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from proxy_harness import RunningProxy

from sdclient.testing import InferenceTestServer, Reply

BODY = {"prompt": "a lighthouse at dusk", "seed": 7}


def _posts(upstream: InferenceTestServer) -> int:
    return len([r for r in upstream.requests if r.method == "POST"])


# -- one visitor's request, one upstream job --------------------------------------------------


def test_a_generation_longer_than_the_upstream_timeout_is_sent_once(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.default = Reply.image(delay=3.0)  # still generating when the proxy stops waiting
    proxy = start_proxy(upstream_timeout=0.5, max_retries=3)
    with proxy.client() as client:
        response = client.post("/generate", json=BODY)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert _posts(upstream) == 1


def test_a_connection_that_fails_before_sending_is_still_retried(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.enqueue(Reply.reset())
    proxy = start_proxy(max_retries=1)
    with proxy.client() as client:
        response = client.post("/generate", json=BODY)
    assert response.status_code == 200, response.text
    assert _posts(upstream) == 2


# -- redirects ----------------------------------------------------------------------------------


def test_app_redirects_stay_on_the_proxys_own_origin(
    start_proxy: Callable[..., RunningProxy], tmp_path: Path
) -> None:
    site = tmp_path / "site"
    (site / "docs").mkdir(parents=True)
    (site / "index.html").write_text("<!doctype html><title>app</title>")
    (site / "docs" / "index.html").write_text("<!doctype html><title>docs</title>")
    proxy = start_proxy(static_dir=site)
    evil = {"Host": "evil.example"}
    with proxy.client(follow_redirects=False) as client:
        answers = {path: client.get(path, headers=evil) for path in ("/", "/app", "/app/docs", "/status/")}
    for path, response in answers.items():
        assert response.status_code in (301, 302, 307, 308), (path, response.status_code)
        location = response.headers["location"]
        assert location.startswith("/") and not location.startswith("//"), (path, location)
        assert "evil.example" not in location
    assert answers["/app"].headers["location"] == "/app/"
    assert answers["/app/docs"].headers["location"] == "/app/docs/"
