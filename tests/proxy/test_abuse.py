"""Limits that cannot be dodged by a visitor, nor turned against other visitors: what is charged
to a quota, who a client is behind proxies and on IPv6, abandoned calls, slow connections, API-key
guessing and the bounds of `Retry-After`."""

from __future__ import annotations

from collections.abc import Callable

from proxy_harness import RunningProxy


def test_invalid_bodies_take_nothing_of_the_daily_quota(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(daily_quota=2)
    with proxy.client() as client:
        invalid = [client.post(path, json={"prompt": ""}) for path in ("/generate", "/generate/stream") * 3]
        answers = [client.post("/generate", json={"prompt": f"fox {i}"}) for i in range(3)]
    assert [a.status_code for a in invalid] == [422] * 6
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].json()["error"]["code"] == "quota_exceeded"
