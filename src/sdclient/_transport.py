"""A connection pool that stays cheap with many requests in flight.

httpx's pool (httpcore 1.x) rescans every connection it holds, probing each idle socket, twice per
request; with N requests in flight on N connections a request costs O(N²) bookkeeping. At 64
concurrent requests to a fast local server that was most of the client's CPU time (httpx at 64 in
flight ran at about half its throughput at 1). :class:`ShardedTransport` keeps the standard httpx
transport but splits the pool into small ones (4 connections each), opened as needed, and sends
each request to the one with the fewest requests in flight: the bookkeeping stays O(4²) per request
plus a ``min()`` over the pools. Everything else (HTTP/1.1, TLS, timeouts, the exceptions raised)
is httpx's own.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import httpx

__all__ = ["ShardedTransport"]

SHARD_SIZE = 4
"""Connections per pool."""


class _Shard:
    __slots__ = ("in_flight", "transport")

    def __init__(self, transport: httpx.AsyncHTTPTransport) -> None:
        self.transport = transport
        self.in_flight = 0


class _CountedStream(httpx.AsyncByteStream):
    """A response body that gives its pool's slot back when it is closed."""

    def __init__(self, stream: httpx.AsyncByteStream, shard: _Shard) -> None:
        self._stream = stream
        self._shard: _Shard | None = shard

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        if self._shard is not None:
            self._shard.in_flight -= 1
            self._shard = None
        await self._stream.aclose()


class ShardedTransport(httpx.AsyncBaseTransport):
    """httpx transport over several small connection pools (see the module docstring).

    Args:
        max_connections: Connections over all pools.
        trust_env: Read ``SSL_CERT_FILE``/``SSL_CERT_DIR`` like httpx does. (Proxies from the
            environment are not handled here: :class:`SDClient` uses httpx's own transport when
            one is configured.)
    """

    def __init__(self, *, max_connections: int = 100, trust_env: bool = True) -> None:
        self._pools = max(1, math.ceil(max_connections / SHARD_SIZE))
        self._size = math.ceil(max_connections / self._pools)
        # One TLS context for all pools: building one loads the CA bundle (tens of ms).
        self._ssl = httpx.create_ssl_context(trust_env=trust_env)
        self._shards: list[_Shard] = []

    def _new_shard(self) -> _Shard:
        limits = httpx.Limits(max_connections=self._size, max_keepalive_connections=self._size)
        shard = _Shard(httpx.AsyncHTTPTransport(verify=self._ssl, limits=limits))
        self._shards.append(shard)
        return shard

    def _pick(self) -> _Shard:
        shard = min(self._shards, key=_in_flight) if self._shards else None
        if shard is None or (shard.in_flight >= self._size and len(self._shards) < self._pools):
            shard = self._new_shard()
        return shard

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        shard = self._pick()
        shard.in_flight += 1
        try:
            response = await shard.transport.handle_async_request(request)
        except BaseException:
            shard.in_flight -= 1
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _CountedStream(response.stream, shard)
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.transport.aclose()
        self._shards.clear()


def _in_flight(shard: _Shard) -> int:
    return shard.in_flight
