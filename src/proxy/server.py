"""The HTTP protocol `sdproxy serve` runs: uvicorn's, with deadlines for slow clients.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but gives no deadline to a
connection that has sent part of a request: one that sends half its headers, or trickles its body,
is held for as long as it stays open, and a few hundred of them use up a small file-descriptor
limit. Here a connection has `header_timeout_s` to send a request's headers (counted from its
opening, or from the previous answer), then `body_timeout_s` to send the body; past either it is
closed, as it is once it sends more than `MAX_HEADER_BYTES` before its headers are complete.
While the app works on a request (a long stream included) no deadline runs.

Both of uvicorn's HTTP implementations are covered: httptools when it is installed (what uvicorn
picks by itself), else h11. The deadlines come from the settings, read once per worker process
(the workers are spawned and read the same environment as the app).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import load_settings

__all__ = ["H11DeadlineProtocol", "HttpToolsDeadlineProtocol", "protocol_class"]

logger = logging.getLogger("proxy.server")

MAX_HEADER_BYTES = 64 * 1024
"""Most bytes a connection may send before a request's headers are complete (httptools has no
bound of its own; `sdproxy serve` gives h11 this one)."""


class _Deadlines(asyncio.Protocol):
    """Per-connection deadlines, mixed in front of a uvicorn protocol: it relies on its
    `connection_made`, `data_received`, `on_response_complete`, `connection_lost`, and on
    `self.cycle`, the request being read (a new one once its headers are in; `more_body` false
    once its body is)."""

    header_timeout_s: float | None = None
    body_timeout_s: float | None = None

    transport: asyncio.Transport
    cycle: Any
    loop: asyncio.AbstractEventLoop

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if _Deadlines.header_timeout_s is None:
            settings = load_settings()
            _Deadlines.header_timeout_s = settings.header_timeout_s
            _Deadlines.body_timeout_s = settings.body_timeout_s
        self._timer: asyncio.TimerHandle | None = None
        self._phase = "headers"
        self._cycle_before: Any = None
        self._header_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._waiting_for_request()

    def data_received(self, data: bytes) -> None:
        if self._phase == "headers":
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._close("sent more than %d bytes of headers", MAX_HEADER_BYTES)
                return
        super().data_received(data)
        self._advance()

    def on_response_complete(self) -> None:
        # Before the base class: it may start reading a pipelined request at once.
        if not self.transport.is_closing():
            self._waiting_for_request()
        super().on_response_complete()  # type: ignore[misc]
        self._advance()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_request(self) -> None:
        self._phase = "headers"
        self._cycle_before = self.cycle
        self._header_bytes = 0
        self._arm(self.header_timeout_s, "request headers")

    def _advance(self) -> None:
        """Move the deadline on as the request comes in: headers, then body, then none."""
        cycle = self.cycle
        if self._phase == "headers" and cycle is not None and cycle is not self._cycle_before:
            self._phase = "body"
            self._arm(self.body_timeout_s, "request body")
        if self._phase == "body" and not cycle.more_body:
            self._phase = "app"
            self._disarm()

    def _arm(self, seconds: float | None, what: str) -> None:
        self._disarm()
        if seconds is not None:
            self._timer = self.loop.call_later(seconds, self._expire, what)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, what: str) -> None:
        self._timer = None
        self._close("did not send its %s in time", what)

    def _close(self, why: str, *args: object) -> None:
        self._disarm()
        if not self.transport.is_closing():
            peer = self.transport.get_extra_info("peername")
            logger.info("closed a connection that " + why, *args, extra={"client_addr": str(peer)})
            self.transport.close()


class H11DeadlineProtocol(_Deadlines, H11Protocol):
    """uvicorn's h11 protocol with the header and body deadlines."""


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional (uvicorn[standard] installs it)
    HttpToolsDeadlineProtocol: type[asyncio.Protocol] | None = None
else:

    class HttpToolsDeadlineProtocol(_Deadlines, HttpToolsProtocol):  # type: ignore[no-redef]
        """uvicorn's httptools protocol with the header and body deadlines."""


def protocol_class() -> type[asyncio.Protocol]:
    """The protocol for `sdproxy serve`: on httptools when installed (as uvicorn's `auto`), else h11.
    A module-level class: uvicorn hands it to spawned workers by name."""
    return HttpToolsDeadlineProtocol or H11DeadlineProtocol
