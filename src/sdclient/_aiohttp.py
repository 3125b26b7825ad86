"""``http_backend="aiohttp"``: httpx on aiohttp's connection pool (the ``aiohttp`` extra).

httpx's own transport (httpcore) costs about a millisecond of CPU per request. With many requests
in flight to a fast server, aiohttp's pool, parser and socket handling do the same work in well
under half that (``benchmarks/bench_client.py`` and ``bench_proxy.py`` measure both). The plumbing
between the two is ``httpx-aiohttp``'s transport; what this module adds is the exceptions: every
aiohttp failure becomes the httpx exception that httpx itself raises for that failure, so that
:class:`SDClient` retries and reports it the same way whichever backend sends (a refused
connection is a ``ConnectError``, not a timeout; a server that hangs up is a
``RemoteProtocolError``).
"""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator

import httpx

try:
    import aiohttp
    from httpx_aiohttp import AiohttpTransport as _BaseTransport
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "http_backend='aiohttp' needs aiohttp and httpx-aiohttp: pip install 'sdclient[aiohttp]'"
    ) from exc

__all__ = ["AiohttpTransport"]

# What sending can raise: aiohttp's errors, the OS's (TimeoutError among them), and httpx's own.
_FAILURES = (aiohttp.ClientError, OSError, httpx.TransportError)


def _as_httpx(exc: BaseException) -> BaseException:
    """The httpx exception for an aiohttp failure (possibly already half-mapped by httpx-aiohttp);
    `exc` itself when it is right as it is."""
    original = exc.__cause__ if isinstance(exc, httpx.TransportError) and exc.__cause__ else exc
    message = str(original) or type(original).__name__
    if isinstance(original, aiohttp.ServerTimeoutError):
        if isinstance(original, aiohttp.ConnectionTimeoutError):
            return httpx.ConnectTimeout(message)
        if isinstance(original, aiohttp.SocketTimeoutError):
            return httpx.ReadTimeout(message)
        return httpx.TimeoutException(message)
    if isinstance(original, TimeoutError):
        return httpx.TimeoutException(message)
    if isinstance(original, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(original, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(f"Server disconnected without a complete answer ({message})")
    if isinstance(original, aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(f"Incomplete body ({message})")
    if isinstance(original, aiohttp.ClientResponseError):  # a malformed status line or header
        return httpx.RemoteProtocolError(message)
    if isinstance(original, OSError):
        return httpx.ReadError(message)
    if isinstance(original, aiohttp.ClientError):
        return httpx.NetworkError(message)
    return exc


class _Body(httpx.AsyncByteStream):
    """A response body whose read errors come out as httpx exceptions."""

    def __init__(self, stream: httpx.AsyncByteStream) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except _FAILURES as exc:
            mapped = _as_httpx(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends with one ``aiohttp.ClientSession``.

    Args:
        max_connections: The session's connection limit.
        trust_env: Use ``HTTP(S)_PROXY``/``NO_PROXY`` and ``SSL_CERT_FILE``/``SSL_CERT_DIR`` from
            the environment, as httpx does.
    """

    def __init__(self, *, max_connections: int = 100, trust_env: bool = True) -> None:
        ssl_context = httpx.create_ssl_context(trust_env=trust_env)
        # A session that trusts the environment looks its proxies and ~/.netrc up again on every
        # request (about a millisecond of CPU): only ask for it when there are proxies to apply.
        use_env_proxies = trust_env and bool(urllib.request.getproxies())

        def session() -> aiohttp.ClientSession:
            # Built on the first request, inside the event loop that will use it.
            connector = aiohttp.TCPConnector(limit=max_connections, ssl=ssl_context)
            return aiohttp.ClientSession(connector=connector, trust_env=use_env_proxies)

        self._transport = _BaseTransport(client=session)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self._transport.handle_async_request(request)
        except _FAILURES as exc:
            mapped = _as_httpx(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Body(response.stream)
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()
