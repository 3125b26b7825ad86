"""Errors raised by sdclient.

```
SDClientError
 ├─ UsageLimitExceeded             a budget would be exceeded; nothing was sent
 ├─ InvalidImage                   a 200 whose body is not a decodable image (or an odd provider answer)
 ├─ ProviderNotAvailable           no provider (or not the one named) serves the model (.providers)
 ├─ JobFailed                      the provider ran the job and it failed (.provider)
 ├─ APIConnectionError             connect errors, resets, truncated bodies (after retries)
 │   └─ APITimeoutError            (also a TimeoutError)
 │       └─ JobTimeout             a provider's job not done by max_wait_for_model (cancelled)
 └─ APIStatusError                 .status_code .request_id .message (server's text) .model
     ├─ InvalidRequest             400, 422
     ├─ AuthenticationError        401, 403
     │   └─ PermissionDenied       403
     ├─ InsufficientCredits        402
     ├─ ModelNotFound              404
     ├─ EndpointGone               410 (hint: use the router or an Endpoint)
     ├─ RateLimited                429 (.retry_after)
     ├─ ServerError                5xx (after retries)
     └─ ModelLoadingTimeout        503 loading past max_wait_for_model (.waited_s, .estimated_time);
                                   also a TimeoutError
```

Catch :class:`SDClientError` for everything the client raises on purpose::

    try:
        image = await client.generate("a red fox")
    except sdclient.RateLimited as exc:
        print(f"slow down, try again in {exc.retry_after} s")
    except sdclient.SDClientError as exc:
        print(f"generation failed: {exc}")

No error ever holds the token: messages come from the server's body (with any copy of the token
replaced by ``***``) and from the client's own hints.
"""

from __future__ import annotations

from typing import ClassVar

from .protocol import error_message_from_body

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "EndpointGone",
    "InsufficientCredits",
    "InvalidImage",
    "InvalidRequest",
    "JobFailed",
    "JobTimeout",
    "ModelLoadingTimeout",
    "ModelNotFound",
    "PermissionDenied",
    "ProviderNotAvailable",
    "RateLimited",
    "SDClientError",
    "ServerError",
    "UsageLimitExceeded",
    "error_message_from_body",
    "make_status_error",
]


class SDClientError(Exception):
    """Base class of every error sdclient raises on purpose."""


class UsageLimitExceeded(SDClientError):
    """A usage budget would be exceeded by this call; nothing was sent.

    Attributes:
        budget: ``"images"`` or ``"characters"``.
        limit: The configured budget.
        used: What was already used (including calls in flight in this process).
        requested: What this call would have added.
    """

    def __init__(self, *, budget: str, limit: float, used: float, requested: float) -> None:
        self.budget = budget
        self.limit = limit
        self.used = used
        self.requested = requested
        super().__init__(
            f"usage budget for {budget} exceeded: {used:g} used + {requested:g} requested > limit "
            f"{limit:g}; nothing was sent. Raise the limit (UsageTracker(max_{budget}=...)) "
            f"or start a new usage file."
        )


class InvalidImage(SDClientError):
    """The server answered 200, but the body is not an image this client can decode.

    Attributes:
        model: The model (id or URL) that was called.
        content_type: The ``Content-Type`` the server sent.
        request_id: The server's ``x-request-id``, if any.
    """

    def __init__(self, message: str, *, model: str, content_type: str | None, request_id: str | None) -> None:
        self.model = model
        self.content_type = content_type
        self.request_id = request_id
        super().__init__(message + (f" (request id {request_id})" if request_id else ""))


class APIConnectionError(SDClientError):
    """The request did not get a complete answer: connect error, reset, truncated body.

    Raised after the retries allowed by ``max_retries`` (and the deadline) were spent.

    Attributes:
        model: The model (id or URL) that was called.
        message: What went wrong, without the token.
    """

    def __init__(self, message: str, *, model: str, refused: bool = False) -> None:
        self.model = model
        self.message = message
        self.refused = refused
        """Nothing listened at the address (retried until the deadline: a server may be starting)."""
        super().__init__(message)


class APITimeoutError(APIConnectionError, TimeoutError):
    """The server did not answer within the configured ``timeout`` (after retries).

    Attributes:
        sent: Whether a generation request (a POST) may have reached the server before the time
            ran out (every timeout but connecting or waiting for a pooled connection): the server
            may then still be generating, and a re-send would start a second job (see
            ``RetryPolicy.retry_read_timeouts``). Always false for GETs (job status, downloads).
    """

    def __init__(self, message: str, *, model: str, sent: bool = False) -> None:
        self.sent = sent
        super().__init__(message, model=model)


class ProviderNotAvailable(SDClientError):
    """No Inference Provider this client supports serves the model (or not the one named).

    Attributes:
        model: The Hub model id.
        providers: The supported providers that do serve it (empty: none).
    """

    def __init__(self, message: str, *, model: str, providers: list[str]) -> None:
        self.model = model
        self.providers = providers
        super().__init__(message)


class JobFailed(SDClientError):
    """The provider accepted the job, ran it, and reports that it failed (or was cancelled). Not retried.

    Attributes:
        model: The Hub model id.
        provider: The provider.
        message: The provider's message.
    """

    def __init__(self, message: str, *, model: str, provider: str) -> None:
        self.model = model
        self.provider = provider
        self.message = message
        super().__init__(f"the {provider} job for {model} failed: {message}")


class JobTimeout(APITimeoutError):
    """A provider's job was still queued or running at ``max_wait_for_model``; it was cancelled
    where the provider allows it.

    Attributes:
        provider: The provider.
        waited_s: Seconds spent polling.
    """

    def __init__(self, message: str, *, model: str, provider: str, waited_s: float) -> None:
        self.provider = provider
        self.waited_s = waited_s
        super().__init__(message, model=model)


class APIStatusError(SDClientError):
    """The server answered with an error status.

    Attributes:
        status_code: The HTTP status.
        message: The server's own message (from ``{"error": ...}``, or trimmed text/HTML).
        request_id: The server's ``x-request-id``, if any.
        model: The model (id or URL) that was called.
        hint: What to do about it, when the client knows.
        retry_after: Seconds the server asked to wait (``Retry-After``), if it said.
    """

    hint_text: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        model: str,
        request_id: str | None = None,
        hint: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status_code = status_code
        self.retry_after = retry_after
        self.message = message
        self.model = model
        self.request_id = request_id
        self.hint = hint if hint is not None else self.hint_text
        text = f"HTTP {status_code} from {model}: {message}"
        if self.hint:
            text += f". {self.hint}"
        if request_id:
            text += f" (request id {request_id})"
        super().__init__(text)


class InvalidRequest(APIStatusError):
    """400 or 422: the server refused the parameters. Not retried."""

    hint_text = "Check the generation parameters (width/height, steps, guidance, scheduler)"


class AuthenticationError(APIStatusError):
    """401 (or 403, see :class:`PermissionDenied`): the token is missing or not accepted. Not retried."""

    hint_text = (
        "Check HF_TOKEN (or log in with `hf auth login`); a fine-grained token needs the "
        '"Make calls to Inference Providers" permission'
    )


class PermissionDenied(AuthenticationError):
    """403: the token is valid but may not call this model or endpoint. Not retried."""

    hint_text = (
        "The token may not call this model: a fine-grained token needs the "
        '"Make calls to Inference Providers" permission (and access to private or gated models); '
        "check HF_TOKEN or `hf auth login`"
    )


class InsufficientCredits(APIStatusError):
    """402: the account has run out of inference credits. Not retried."""

    hint_text = (
        "Out of inference credits: add credits at https://huggingface.co/settings/billing, "
        "or serve the model on your own Endpoint"
    )


class ModelNotFound(APIStatusError):
    """404: no such model, or the endpoint URL is wrong. Not retried."""

    hint_text = (
        "Check the model id is spelled right (owner/name) and the model exists; "
        "for an Endpoint URL, check the URL and that the endpoint is running"
    )


class EndpointGone(APIStatusError):
    """410: the host or model is retired. Not retried."""

    hint_text = (
        "The legacy api-inference.huggingface.co host is retired: use the router (the default "
        "base URL, https://router.huggingface.co/hf-inference) or a dedicated Inference Endpoint URL"
    )


class RateLimited(APIStatusError):
    """429: too many requests, still limited after the retries (``.retry_after``: seconds asked)."""

    hint_text = "Slow down (lower the concurrency) or try again later"

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 429,
        model: str,
        request_id: str | None = None,
        hint: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        if hint is None and retry_after is not None:
            hint = f"The server asked to wait {retry_after:g} s before trying again"
        super().__init__(
            message,
            status_code=status_code,
            model=model,
            request_id=request_id,
            hint=hint,
            retry_after=retry_after,
        )


class ServerError(APIStatusError):
    """5xx: the server failed, and kept failing through the retries."""


class ModelLoadingTimeout(APIStatusError, TimeoutError):
    """The model was still loading (503 with ``estimated_time``) when ``max_wait_for_model`` ran out.

    Attributes:
        waited_s: Seconds this call waited for the model.
        estimated_time: The server's last estimate of the seconds left, if it gave one.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str,
        waited_s: float,
        estimated_time: float | None,
        request_id: str | None = None,
    ) -> None:
        self.waited_s = waited_s
        self.estimated_time = estimated_time
        eta = f"; it estimated {estimated_time:.0f} s more" if estimated_time is not None else ""
        hint = (
            f"Gave up after waiting {waited_s:.1f} s for the model to load{eta}. "
            "Raise max_wait_for_model or try again later"
        )
        super().__init__(message, status_code=503, model=model, request_id=request_id, hint=hint)


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: InvalidRequest,
    401: AuthenticationError,
    402: InsufficientCredits,
    403: PermissionDenied,
    404: ModelNotFound,
    410: EndpointGone,
    422: InvalidRequest,
    429: RateLimited,
}


def make_status_error(
    status_code: int,
    message: str,
    *,
    model: str,
    request_id: str | None = None,
    retry_after: float | None = None,
    hint: str | None = None,
) -> APIStatusError:
    """Build the error for an HTTP status: the one place that maps status codes to classes.

    Args:
        status_code: The HTTP status the server answered (400 or more).
        message: The server's message (see :func:`error_message_from_body`).
        model: The model (id or URL) that was called.
        request_id: The server's ``x-request-id``.
        retry_after: Seconds from ``Retry-After`` (kept on :class:`RateLimited`).
        hint: What to do, instead of the class's own hint.

    Returns:
        An instance of the most specific :class:`APIStatusError` subclass.
    """
    cls = _STATUS_ERRORS.get(status_code)
    if cls is None:
        cls = ServerError if status_code >= 500 else APIStatusError
    return cls(
        message,
        status_code=status_code,
        model=model,
        request_id=request_id,
        retry_after=retry_after,
        hint=hint,
    )
