"""The outermost layer: a request id on every answer and in every log line, one access-log line per
request, and a JSON 500 (never a traceback) for anything unexpected."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import Busy, PayloadTooLarge, ProxyError, SecretRegistry, current_secrets, error_response
from .logs import request_id_var

if TYPE_CHECKING:
    from .deps import LifespanState

__all__ = [
    "REQUEST_ID_HEADER",
    "BodyLimitMiddleware",
    "LoadSheddingMiddleware",
    "RelativeRedirectMiddleware",
    "RequestContextMiddleware",
    "accept_request_id",
    "relative_location",
]

REQUEST_ID_HEADER = "X-Request-ID"

_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

access_logger = logging.getLogger("proxy.access")
logger = logging.getLogger("proxy")


def accept_request_id(incoming: str | None) -> str:
    """The incoming id when it is sane (1-128 of `A-Za-z0-9._:-`), else a fresh one."""
    if incoming and _SANE_ID.match(incoming):
        return incoming
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Sets `request_id_var` and the app's `current_secrets`, adds `X-Request-ID` to the answer
    and logs one line per request."""

    def __init__(self, app: ASGIApp, secrets: SecretRegistry) -> None:
        self.app = app
        self.secrets = secrets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = accept_request_id(incoming)
        token = request_id_var.set(request_id)
        secrets_token = current_secrets.set(self.secrets)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error")
            if status == 0:
                status = 500
                response = error_response(ProxyError("Internal error. The request id helps the operator."))
                response.headers[REQUEST_ID_HEADER] = request_id
                await response(scope, receive, send)
        finally:
            access_logger.info(
                "%s %s %s",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    "client_addr": (scope.get("client") or ("-",))[0],
                },
            )
            request_id_var.reset(token)
            current_secrets.reset(secrets_token)


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413 `payload_too_large`: at once when
    `Content-Length` says so, else as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(self._error())
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException reaches the app's handlers, which answer in the one shape.
                    raise HTTPException(413, self._error().message)
            return message

        await self.app(scope, limited_receive, send)

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than {self.max_bytes} bytes.")


class LoadSheddingMiddleware:
    """Refuse `POST /generate` and `/generate/stream` with 503 `busy` before
    anything else (body, validation, rate limit) while the admission queue is full: under overload
    a refusal costs as little as possible and never waits behind the requests that were let in.
    It asks the queue's one busy check (`AdmissionQueue.refuse_if_full`), which `slot()` applies
    again for every route (jobs and the OpenAI route included)."""

    PATHS = frozenset({"/generate", "/generate/stream"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.PATHS:
            lifespan: LifespanState | None = scope.get("state")  # what the app's lifespan yielded
            state = lifespan.get("proxy") if lifespan is not None else None
            if state is not None:
                try:
                    state.service.admission.refuse_if_full()
                except Busy as exc:
                    await error_response(exc)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class RelativeRedirectMiddleware:
    """Make every redirect of the app relative (`/app/`, not `http://<Host>/app/`).

    Starlette builds the absolute URL of its own redirects (a missing trailing slash, a static
    folder) from the request's `Host` header, which the caller chooses: a cache or a page in front
    of the proxy could then be sent anywhere. The proxy only ever redirects to itself, so the
    scheme and host are dropped and the path and query kept."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def relative_send(message: Message) -> None:
            if message["type"] == "http.response.start" and 300 <= message["status"] < 400:
                headers = MutableHeaders(scope=message)
                location = headers.get("location")
                if location is not None:
                    headers["location"] = relative_location(location)
            await send(message)

        await self.app(scope, receive, relative_send)


def relative_location(location: str) -> str:
    """`location` without scheme and host: a path on this origin, `/` at least, and never one that
    a browser reads as another host (`//host`, `/\\host`)."""
    parts = urlsplit(location)
    path = "/" + parts.path.lstrip("/\\")
    return path + (f"?{parts.query}" if parts.query else "")
