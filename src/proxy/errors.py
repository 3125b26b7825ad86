"""Errors of the proxy, their one JSON shape, and the translation of the client's errors.

Every error answer is `{"error": {"code", "message", "retry_after"?}}`; `retry_after` (whole
seconds) is also sent as `Retry-After`.

```
ProxyError
 ├─ InvalidInput          422 validation_error
 ├─ PayloadTooLarge       413 payload_too_large
 ├─ Unauthorized          401 unauthorized       (client API key or admin key)
 ├─ NotFound              404 not_found
 ├─ Conflict              409 idempotency_conflict (an Idempotency-Key reused with another body)
 ├─ RateLimitExceeded     429 rate_limited       (this proxy's per-client limit, or the upstream's)
 ├─ QuotaExceeded         429 quota_exceeded     (per-client daily images, or the service's budget)
 ├─ ModelLoading          503 model_loading      (cold start longer than the configured wait)
 ├─ Busy                  503 busy               (every slot and queue place taken)
 ├─ NotReady              503 not_ready          (starting or stopping)
 ├─ StoreUnavailable      503 store_unavailable  (the shared store, Redis, cannot be reached)
 ├─ UpstreamTimeout       504 upstream_timeout
 └─ UpstreamFailure       502 upstream_error
     ├─ UpstreamAuth          upstream_auth      (the proxy's token was refused)
     ├─ UpstreamNotFound      upstream_not_found (wrong model id or URL, retired host)
     ├─ UpstreamCredits       upstream_credits   (out of credits)
     ├─ UpstreamRejected      upstream_rejected  (the model server refused the parameters)
     └─ UpstreamJobFailed     upstream_job_failed (an Inference Provider ran the job; it failed)
```

Messages written for upstream failures never contain the token nor where the upstream is: they
are composed here from the status code, and of the model server's own text only a short excerpt
is passed on, through `public_text()`: secrets masked, URLs, host names and addresses replaced,
control characters dropped, one line of at most `MAX_SERVER_TEXT` characters. The full text is
the operator's, in the log.

The secrets to mask are kept per app (`SecretRegistry`): the app makes the registry current
(`current_secrets`) for its lifespan and each request, so two apps in one process never see each
other's secrets.
"""

from __future__ import annotations

import contextvars
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import sdclient
from proxy.schemas import GenerateBody

__all__ = [
    "Busy",
    "Conflict",
    "InvalidInput",
    "MAX_RETRY_AFTER_S",
    "ModelLoading",
    "NotFound",
    "NotReady",
    "PayloadTooLarge",
    "ProxyError",
    "QuotaExceeded",
    "RateLimitExceeded",
    "SecretRegistry",
    "StoreUnavailable",
    "Unauthorized",
    "UpstreamAuth",
    "UpstreamCredits",
    "UpstreamFailure",
    "UpstreamNotFound",
    "UpstreamJobFailed",
    "UpstreamRejected",
    "UpstreamTimeout",
    "bounded_seconds",
    "current_secrets",
    "error_body",
    "error_from_body",
    "error_response",
    "from_client_error",
    "install_error_handlers",
    "public_text",
    "redact",
]

logger = logging.getLogger("proxy.errors")

MAX_RETRY_AFTER_S = 86_400
"""The longest `Retry-After` (and `retry_after`) the proxy sends: a day, the longest wait for a
limit of its own to reset (a monthly budget's refusal says a day: asked again, it says so again).
Estimates from upstream are clamped to it, however large (or infinite) they are."""


def bounded_seconds(seconds: float) -> float:
    """`seconds` within 0 and `MAX_RETRY_AFTER_S` (NaN and infinity included): for any wait or
    estimate the proxy passes on from upstream."""
    if math.isnan(seconds):
        return float(MAX_RETRY_AFTER_S)
    return min(max(0.0, seconds), float(MAX_RETRY_AFTER_S))


class SecretRegistry:
    """The secrets of one app (its token, API keys, admin key, webhook secret), masked by `redact`."""

    def __init__(self) -> None:
        self._secrets: list[str] = []

    def add(self, secret: str | None) -> None:
        """Remember a secret so that `redact()` masks it wherever it shows up."""
        if secret and secret not in self._secrets:
            self._secrets.append(secret)

    def redact(self, text: str) -> str:
        """Mask every registered secret in `text`."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


current_secrets: contextvars.ContextVar[SecretRegistry | None] = contextvars.ContextVar(
    "current_secrets", default=None
)
"""The registry of the app running the current task (set by the app's lifespan and middleware)."""


def redact(text: str) -> str:
    """Mask every secret of the current app in `text`."""
    registry = current_secrets.get()
    return text if registry is None else registry.redact(text)


class ProxyError(Exception):
    """An error answered to the caller as `{"error": {"code", "message", "retry_after"?}}`.

    Attributes:
        status_code: The HTTP status of the answer.
        code: The stable machine-readable code.
        message: What went wrong and what to do, for a person.
        retry_after: Seconds to wait before trying again, or None.
    """

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = None if retry_after is None else max(1, math.ceil(bounded_seconds(retry_after)))


class InvalidInput(ProxyError):
    status_code, code = 422, "validation_error"


class PayloadTooLarge(ProxyError):
    status_code, code = 413, "payload_too_large"


class Unauthorized(ProxyError):
    status_code, code = 401, "unauthorized"


class NotFound(ProxyError):
    status_code, code = 404, "not_found"


class Conflict(ProxyError):
    status_code, code = 409, "idempotency_conflict"


class RateLimitExceeded(ProxyError):
    status_code, code = 429, "rate_limited"


class QuotaExceeded(ProxyError):
    status_code, code = 429, "quota_exceeded"


class ModelLoading(ProxyError):
    status_code, code = 503, "model_loading"


class Busy(ProxyError):
    status_code, code = 503, "busy"


class NotReady(ProxyError):
    status_code, code = 503, "not_ready"


class StoreUnavailable(ProxyError):
    status_code, code = 503, "store_unavailable"

    def __init__(self, message: str, *, retry_after: float | None = 2) -> None:
        super().__init__(message, retry_after=retry_after)


class UpstreamTimeout(ProxyError):
    status_code, code = 504, "upstream_timeout"


class UpstreamFailure(ProxyError):
    status_code, code = 502, "upstream_error"


class UpstreamAuth(UpstreamFailure):
    code = "upstream_auth"


class UpstreamNotFound(UpstreamFailure):
    code = "upstream_not_found"


class UpstreamCredits(UpstreamFailure):
    code = "upstream_credits"


class UpstreamRejected(UpstreamFailure):
    code = "upstream_rejected"


class UpstreamJobFailed(UpstreamFailure):
    code = "upstream_job_failed"


MAX_SERVER_TEXT = 160
"""Longest excerpt of an upstream's own text in a public message."""

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S*", re.IGNORECASE)
_ADDRESS = re.compile(
    r"\[[0-9a-f:.]+\](?::\d+)?"  # [::1]:8080
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"  # 10.0.0.7:7860
    r"|\b(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,}(?::\d+)?\b"  # api.example.com:443
    r"|\blocalhost(?::\d+)?\b",
    re.IGNORECASE,
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def public_text(text: str, limit: int = MAX_SERVER_TEXT) -> str:
    """What of an upstream's text may be shown to the public: secrets masked, URLs (`<url>`) and
    host names or addresses (`<host>`) replaced, control characters and line breaks collapsed,
    cut to `limit` characters."""
    text = redact(text)
    text = _URL.sub("<url>", text)
    text = _ADDRESS.sub("<host>", text)
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _server_text(exc: sdclient.APIStatusError) -> str:
    return public_text(str(exc.message or ""))


def from_client_error(exc: sdclient.SDClientError) -> ProxyError:
    """Translate an error of `SDClient` into what the web page is told.

    The page cannot fix the proxy's configuration, so errors that only the operator can fix
    (token, model id, credits) are 502s that say so plainly.

    Args:
        exc: The error raised by `SDClient.generate`.

    Returns:
        The matching `ProxyError` (not raised).
    """
    if isinstance(exc, sdclient.ModelLoadingTimeout):
        eta = None if exc.estimated_time is None else bounded_seconds(exc.estimated_time)
        wait = f" (about {math.ceil(eta)} s more)" if eta else ""
        return ModelLoading(
            f"The model is still loading after {exc.waited_s:.0f} s{wait}. Try again shortly.",
            retry_after=eta if eta else 10,
        )
    if isinstance(exc, sdclient.RateLimited):
        return RateLimitExceeded(
            "The model server is rate limiting this service. Try again shortly.",
            retry_after=exc.retry_after if exc.retry_after else 10,
        )
    if isinstance(exc, sdclient.AuthenticationError):
        return UpstreamAuth(
            f"The model server refused this service's credentials (HTTP {exc.status_code}). "
            "The operator must check the proxy's token (HF_TOKEN or SDPROXY_UPSTREAM_TOKEN) "
            "and its permissions."
        )
    if isinstance(exc, sdclient.ModelNotFound | sdclient.EndpointGone):
        return UpstreamNotFound(
            f"The model server does not know the configured model (HTTP {exc.status_code}: "
            f"{_server_text(exc)}). The operator must check SDPROXY_MODEL."
        )
    if isinstance(exc, sdclient.InsufficientCredits):
        return UpstreamCredits(
            "The model provider's account has run out of credits (HTTP 402). The operator must add credits."
        )
    if isinstance(exc, sdclient.InvalidRequest):
        return UpstreamRejected(
            f"The model server refused these parameters (HTTP {exc.status_code}): {_server_text(exc)}"
        )
    if isinstance(exc, sdclient.ProviderNotAvailable):
        return UpstreamNotFound(
            f"No Inference Provider serves the configured model this way: {public_text(str(exc))}. "
            "The operator must check SDPROXY_MODEL and SDPROXY_PROVIDER."
        )
    if isinstance(exc, sdclient.JobFailed):
        return UpstreamJobFailed(f"The {exc.provider} job failed: {public_text(exc.message)}")
    if isinstance(exc, sdclient.JobTimeout):
        return UpstreamTimeout(
            f"The {exc.provider} job was not done after {exc.waited_s:.0f} s (its queue is long). "
            "Try again later."
        )
    if isinstance(exc, sdclient.APIStatusError):
        return UpstreamFailure(
            f"The model server failed (HTTP {exc.status_code}) and kept failing after retries. "
            "Try again later."
        )
    if isinstance(exc, sdclient.APITimeoutError):
        return UpstreamTimeout("The model server did not answer in time. Try again later.")
    if isinstance(exc, sdclient.APIConnectionError):
        return UpstreamFailure("The model server could not be reached. Try again later.")
    if isinstance(exc, sdclient.InvalidImage):
        return UpstreamFailure("The model server answered something that is not an image.")
    if isinstance(exc, sdclient.UsageLimitExceeded):
        return QuotaExceeded("This service's image budget is used up. Try again tomorrow.")
    return UpstreamFailure("The model server call failed. Try again later.")


def error_body(exc: ProxyError) -> dict[str, Any]:
    """The JSON body for `exc` (also the data of the stream's `error` event)."""
    detail: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.retry_after is not None:
        detail["retry_after"] = exc.retry_after
    return {"error": detail}


def error_from_body(status_code: int, body: dict[str, Any]) -> ProxyError:
    """The inverse of `error_body`: an error answered by another instance, to raise here."""
    detail = body["error"]
    error = ProxyError(detail["message"], retry_after=detail.get("retry_after"))
    error.status_code = status_code
    error.code = detail["code"]
    return error


def error_response(exc: ProxyError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The HTTP answer for `exc`, with `Retry-After` where it applies."""
    all_headers = dict(headers or {})
    if exc.retry_after is not None:
        all_headers["Retry-After"] = str(exc.retry_after)
    return JSONResponse(error_body(exc), status_code=exc.status_code, headers=all_headers)


_EXAMPLE = '{"prompt": "a red fox"}'


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """One readable sentence per problem, naming the field, e.g. `width: must be a multiple of 8`."""
    parts = []
    for error in errors[:5]:
        loc = [str(item) for item in error.get("loc", ()) if item != "body"]
        kind = error.get("type", "")
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if kind == "json_invalid":
            parts.append("the body is not valid JSON: send an object such as " + _EXAMPLE)
            continue
        if not loc:
            if kind == "missing":
                message = "the body is missing: send a JSON object such as " + _EXAMPLE
            parts.append(f"body: {message}" if kind != "missing" else message)
            continue
        field = ".".join(loc)
        if kind == "extra_forbidden":
            message = f"unknown field (allowed: {', '.join(GenerateBody.model_fields)})"
        elif kind == "missing":
            message = "required"
        elif kind in ("int_type", "int_parsing", "float_type", "float_parsing", "int_from_float"):
            message = f"{message} (got {error.get('input')!r})"[:120]
        parts.append(f"{field}: {message}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return "; ".join(parts) or "invalid request"


_HTTP_CODES = {
    401: "unauthorized",
    404: "not_found",
    409: "idempotency_conflict",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error raised inside the app in the one shape."""

    @app.exception_handler(ProxyError)
    async def _proxy_error(request: Request, exc: ProxyError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(InvalidInput(describe_validation_errors(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not read the body (bytes that are not UTF-8 JSON)
            return error_response(
                InvalidInput("the body is not valid JSON: send UTF-8 JSON such as " + _EXAMPLE)
            )
        error = ProxyError(str(exc.detail))
        error.status_code = exc.status_code
        error.code = _HTTP_CODES.get(exc.status_code, "http_error")
        if exc.status_code == 404:
            error.message = f"No such path: {request.url.path}. See /docs for the API."
        return error_response(error, headers=dict(exc.headers or {}))
