"""The connection pools under SDClient (httpx's, sharded, and aiohttp's): bounded connections, reuse,
slots given back."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
import pytest
from client_harness import MakeClient

import sdclient
from sdclient._aiohttp import AiohttpTransport
from sdclient._transport import SHARD_SIZE, ShardedTransport
from sdclient.testing import InferenceTestServer, Reply


def in_flight(client: sdclient.SDClient) -> int:
    """Connections the client's pool holds for requests (not idle ones)."""
    transport = client._http._transport
    if isinstance(transport, ShardedTransport):
        return sum(shard.in_flight for shard in transport._shards)
    assert isinstance(transport, AiohttpTransport)
    session = transport._transport.client
    assert isinstance(session, aiohttp.ClientSession) and session.connector is not None
    return len(session.connector._acquired)  # type: ignore[attr-defined]


def pools(client: sdclient.SDClient) -> int | None:
    """How many small pools the sharded transport opened (None with aiohttp: it has one)."""
    transport = client._http._transport
    return len(transport._shards) if isinstance(transport, ShardedTransport) else None


async def test_many_concurrent_calls_stay_within_the_connection_limit(
    server: InferenceTestServer, make_client: MakeClient
):
    server.default = Reply.image(delay=0.05)
    client = make_client(max_concurrency=8)

    images = await asyncio.gather(*(client.generate(str(i)) for i in range(40)))

    assert len(images) == 40
    assert server.connections_opened <= 8
    assert pools(client) in (None, 8 // SHARD_SIZE)
    assert in_flight(client) == 0


async def test_sequential_calls_reuse_one_connection_of_one_pool(
    server: InferenceTestServer, make_client: MakeClient
):
    client = make_client()
    for _ in range(5):
        await client.generate("a fox")
    assert server.connections_opened == 1
    assert pools(client) in (None, 1)


async def test_requests_spread_over_pools_as_concurrency_grows(server: InferenceTestServer):
    server.default = Reply.image(delay=0.1)
    async with httpx.AsyncClient(transport=ShardedTransport(max_connections=12)) as http:
        url = server.model_url("user/m")
        responses = await asyncio.gather(*(http.post(url, json={"inputs": str(i)}) for i in range(12)))
        transport = http._transport
        assert isinstance(transport, ShardedTransport)
        assert [shard.in_flight for shard in transport._shards] == [0, 0, 0]
    assert all(r.status_code == 200 for r in responses)
    assert server.connections_opened == 12  # all 12 ran at once, over 3 pools of 4


@pytest.mark.parametrize("failure", [Reply.reset(), Reply.truncated(), Reply.hang(), Reply.html(502)])
async def test_failed_requests_give_their_slot_back(
    server: InferenceTestServer, make_client: MakeClient, failure: Reply
):
    server.default = failure
    client = make_client(max_retries=1, timeout=0.2)

    results = await asyncio.gather(*(client.generate("a fox") for _ in range(6)), return_exceptions=True)

    assert all(isinstance(r, sdclient.SDClientError) for r in results)
    assert in_flight(client) == 0
    server.default = Reply.image()
    assert (await client.generate("a fox")).attempts == 1  # the pool still works


async def test_cancelled_calls_give_their_slot_back(server: InferenceTestServer, make_client: MakeClient):
    server.default = Reply.image(delay=5)
    client = make_client()
    tasks = [asyncio.ensure_future(client.generate("a fox")) for _ in range(5)]
    await asyncio.to_thread(server.wait_for_requests, 5, 5.0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0)  # aiohttp gives a cancelled request's connection back on the next turn
    assert in_flight(client) == 0


def test_environment_proxies_keep_httpx_transport(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    client = sdclient.SDClient("user/model")
    assert not isinstance(client._http._transport, ShardedTransport)


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="http_backend must be 'httpx' or 'aiohttp'"):
        sdclient.SDClient("user/model", http_backend="requests")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
        (aiohttp.ClientPayloadError("Response payload is not completed"), httpx.RemoteProtocolError),
        (aiohttp.ConnectionTimeoutError("connect"), httpx.ConnectTimeout),
        (aiohttp.SocketTimeoutError("read"), httpx.ReadTimeout),
        (ConnectionResetError(104, "Connection reset by peer"), httpx.ReadError),
        (TimeoutError(), httpx.TimeoutException),
        (httpx.ConnectTimeout("connect"), httpx.ConnectTimeout),  # already httpx's: kept
    ],
)
def test_aiohttp_failures_become_the_httpx_exceptions_httpx_raises(
    failure: BaseException, expected: type[BaseException]
):
    from sdclient._aiohttp import _as_httpx

    assert type(_as_httpx(failure)) is expected
    # httpx-aiohttp's own mapping calls a server that hangs up a connect timeout: undone.
    mapped = httpx.ConnectTimeout("Server disconnected")
    mapped.__cause__ = aiohttp.ServerDisconnectedError()
    assert type(_as_httpx(mapped)) is httpx.RemoteProtocolError


@pytest.mark.parametrize("proxy", [None, "http://proxy.invalid:3128"])
async def test_aiohttp_backend_reads_proxies_from_the_environment_only_when_there_are_some(
    monkeypatch: pytest.MonkeyPatch, proxy: str | None
):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    if proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy)
    transport = AiohttpTransport()
    factory = transport._transport.client
    assert callable(factory)
    session = factory()
    try:
        # Trusting the environment costs a proxy and ~/.netrc look-up per request.
        assert session.trust_env is (proxy is not None)
    finally:
        await session.close()
