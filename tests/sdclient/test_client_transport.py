"""The sharded connection pool under SDClient: bounded connections, reuse, slots given back."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from client_harness import MakeClient

import sdclient
from sdclient._transport import SHARD_SIZE, ShardedTransport
from sdclient.testing import InferenceTestServer, Reply


def shards(client: sdclient.SDClient) -> ShardedTransport:
    transport = client._http._transport
    assert isinstance(transport, ShardedTransport)
    return transport


async def test_many_concurrent_calls_stay_within_the_connection_limit(
    server: InferenceTestServer, make_client: MakeClient
):
    server.default = Reply.image(delay=0.05)
    client = make_client(max_concurrency=8)

    images = await asyncio.gather(*(client.generate(str(i)) for i in range(40)))

    assert len(images) == 40
    assert server.connections_opened <= 8
    transport = shards(client)
    assert len(transport._shards) == 8 // SHARD_SIZE
    assert all(shard.in_flight == 0 for shard in transport._shards)


async def test_sequential_calls_reuse_one_connection_of_one_pool(
    server: InferenceTestServer, make_client: MakeClient
):
    client = make_client()
    for _ in range(5):
        await client.generate("a fox")
    assert server.connections_opened == 1
    assert len(shards(client)._shards) == 1


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
    assert all(shard.in_flight == 0 for shard in shards(client)._shards)
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
    assert all(shard.in_flight == 0 for shard in shards(client)._shards)


def test_environment_proxies_keep_httpx_transport(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    client = sdclient.SDClient("user/model")
    assert not isinstance(client._http._transport, ShardedTransport)
