"""`http_backend="aiohttp"` (the `aiohttp` extra): the same answers, retries and errors as httpx's
own transport, against the same real server failing on purpose."""

from __future__ import annotations

import socket

import httpx
import pytest
from client_harness import FAST, SENTINEL

from sdclient import APIConnectionError, APITimeoutError, SDClient, ServerError
from sdclient.testing import InferenceTestServer, Reply

pytest.importorskip("httpx_aiohttp", reason="the aiohttp extra is not installed")

MODEL = "user/sd-model"


def _client(url: str, **kwargs: object) -> SDClient:
    return SDClient(url, token=SENTINEL, retry=FAST, http_backend="aiohttp", **kwargs)  # type: ignore[arg-type]


async def test_an_image_with_the_same_request_as_httpx(server: InferenceTestServer) -> None:
    async with _client(server.model_url(MODEL)) as client:
        image = await client.generate("a fox", seed=3, width=64, height=64)
    async with SDClient(server.model_url(MODEL), token=SENTINEL, retry=FAST) as plain:
        again = await plain.generate("a fox", seed=3, width=64, height=64)
    assert image.data == again.data and image.seed == 3
    first, second = server.requests
    assert first.json == second.json
    assert first.headers["authorization"] == second.headers["authorization"] == f"Bearer {SENTINEL}"


@pytest.mark.parametrize("failure", [Reply.reset(), Reply.truncated()])
async def test_resets_and_truncated_bodies_are_retried(server: InferenceTestServer, failure: Reply) -> None:
    server.enqueue(failure, Reply.image())
    async with _client(server.model_url(MODEL)) as client:
        image = await client.generate("a fox")
    assert image.data and len(server.requests) == 2


async def test_5xx_after_retries_is_a_server_error(server: InferenceTestServer) -> None:
    server.enqueue(*[Reply.error(500, "boom")] * 10)
    async with _client(server.model_url(MODEL), max_retries=1) as client:
        with pytest.raises(ServerError):
            await client.generate("a fox")


async def test_a_server_that_hangs_is_a_timeout(server: InferenceTestServer) -> None:
    server.enqueue(*[Reply.hang()] * 5)
    async with _client(server.model_url(MODEL), max_retries=0, timeout=httpx.Timeout(0.3)) as client:
        with pytest.raises(APITimeoutError):
            await client.generate("a fox")


async def test_a_refused_connection_is_a_connection_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    async with _client(f"http://127.0.0.1:{port}/models/m", max_wait_for_model=0.3) as client:
        with pytest.raises(APIConnectionError) as caught:
            await client.generate("a fox")
    assert SENTINEL not in str(caught.value)
