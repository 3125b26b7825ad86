"""What a public deployment relies on: one visitor's request is one upstream job, requests over
the cost budget are refused before anything is sent, the public never sees the upstream's URL or
text, redirects stay on the proxy's own origin, the cache's bound counts every entry, and a broken
usage database is reported instead of crashing.

Over real sockets: the proxy under uvicorn in front of `sdclient.testing`'s server.
"""

from __future__ import annotations

from collections.abc import Callable

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
