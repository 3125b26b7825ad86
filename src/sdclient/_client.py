"""``SDClient``: the async text-to-image client."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, overload
from urllib.parse import urlsplit

import httpx
import tenacity

from ._coldstart import ColdStartGate
from ._constants import (
    DEFAULT_BASE_URL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_WAIT_FOR_MODEL,
    DEFAULT_TIMEOUT,
    HF_HOST_SUFFIXES,
)
from ._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    InvalidImage,
    ModelLoadingTimeout,
    SDClientError,
    error_message_from_body,
    make_status_error,
)
from ._imageinfo import image_size, is_complete, sniff
from ._models import GeneratedImage, GenerateRequest, GenerationEvent, ModelStatus, Timings
from ._retry import RetryPolicy, build_retrying, call_with_retries, parse_retry_after
from ._transport import ShardedTransport
from ._usage import UsageSnapshot, UsageTracker
from ._version import __version__

__all__ = ["EventHook", "SDClient"]

log = logging.getLogger("sdclient")

EventHook = Callable[[GenerationEvent], None]
"""Receives :class:`GenerationEvent` objects; called from the event loop, so it must not block."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_SEED_LIMIT = 2**32  # seeds drawn by the client; any int up to 2**63 may be passed explicitly
_UNAVAILABLE_STATUSES = frozenset({401, 402, 403, 404, 410})


def _is_hf_host(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return any(host == suffix or host.endswith("." + suffix) for suffix in HF_HOST_SUFFIXES)


def _resolve_url(model: str, base_url: str | None) -> str:
    model = model.strip()
    if model.startswith(("http://", "https://")):
        if base_url is not None:
            raise ValueError(
                "Pass either a full endpoint URL as `model` or a Hub model id with `base_url`, not both."
            )
        return model
    if "://" in model:
        raise ValueError(f"model URL must start with http:// or https://, got {model!r}")
    if not _HUB_ID.match(model):
        raise ValueError(
            "model must be a Hub model id like 'user/sd-model' or a full http(s):// endpoint URL, "
            f"got {model!r}"
        )
    base = (base_url or DEFAULT_BASE_URL).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    return f"{base}/models/{model}"


def _environment_proxies() -> bool:
    return any(scheme in ("http", "https", "all") for scheme in urllib.request.getproxies())


def _resolve_token(token: str | None, url: str) -> str | None:
    """The argument, else ``HF_TOKEN``, else the ``hf auth login`` token (for Hugging Face hosts only)."""
    if token is not None:
        token = token.strip()
        if any(c in token for c in "\r\n\0"):
            raise ValueError("token contains a line break or NUL character; check how it was read")
        return token or None
    if not _is_hf_host(url):
        # A token found in the environment or on disk is meant for Hugging Face: never send it
        # to another host. Pass token= explicitly to authenticate elsewhere.
        return None
    discovered = os.environ.get("HF_TOKEN", "").strip()
    if not discovered:
        from huggingface_hub import get_token

        discovered = (get_token() or "").strip()
    return discovered or None


@dataclass
class _Call:
    """Book-keeping of one ``generate`` call."""

    hooks: tuple[EventHook, ...]
    attempts: int = 0
    retries: int = 0


class SDClient:
    """Async client for a text-to-image model served by the Hugging Face protocol.

    It retries what is worth retrying, waits out cold starts (one shared wait per model, however
    many calls are waiting), raises typed errors, and counts usage.

    Args:
        model: A Hub model id (``"user/sd-model"``, sent to ``{base_url}/models/{model}``) or a full
            ``http(s)://`` endpoint URL, used as is.
        token: Sent as ``Authorization: Bearer``. Resolved in this order (first match wins): this
            argument, the ``HF_TOKEN`` environment variable, the token saved by ``hf auth login``.
            A discovered token is only sent to Hugging Face hosts (``*.huggingface.co``,
            ``*.huggingface.cloud``); an explicit one is sent to any URL.
        base_url: Where Hub ids are sent; defaults to the Hugging Face router
            (``https://router.huggingface.co/hf-inference``). Not allowed with a URL ``model``.
        timeout: Seconds (or an ``httpx.Timeout``) for each HTTP request.
        max_wait_for_model: Seconds one call may spend waiting (for a cold start, and in back-off
            sleeps), counted from its first send.
        max_retries: Re-sends after transient failures (429, 5xx, connection errors, timeouts).
        max_concurrency: At most this many calls send at once; others queue. ``None``: no limit.
        usage: Where to count usage (e.g. a shared, file-backed tracker); a fresh in-memory one
            by default.
        http_client: An ``httpx.AsyncClient`` to send with (not closed by :meth:`aclose`).
        http_backend: What sends the requests when no ``http_client`` is given: ``"httpx"``
            (httpx's own transport) or ``"aiohttp"`` (httpx on aiohttp's connection pool; about
            twice the throughput with many requests in flight; ``pip install 'sdclient[aiohttp]'``).
            Errors, retries and timeouts are the same with either.
        headers: Extra headers for every request (e.g. ``{"X-HF-Bill-To": "my-org"}``).
        on_event: Called with every :class:`GenerationEvent` of every call.

    Raises:
        ValueError: A malformed model id or URL, or contradictory arguments.
        ImportError: ``http_backend="aiohttp"`` without the ``aiohttp`` extra installed.

    Example:
        ```python
        async with SDClient("user/sd-raza") as client:
            image = await client.generate("portrait of abraza man", seed=1234)
            image.save("portrait.png")
        ```
    """

    def __init__(
        self,
        model: str,
        *,
        token: str | None = None,
        base_url: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_wait_for_model: float = DEFAULT_MAX_WAIT_FOR_MODEL,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_concurrency: int | None = None,
        usage: UsageTracker | None = None,
        http_client: httpx.AsyncClient | None = None,
        http_backend: Literal["httpx", "aiohttp"] = "httpx",
        headers: Mapping[str, str] | None = None,
        on_event: EventHook | None = None,
        _policy: RetryPolicy | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not max_wait_for_model > 0:
            raise ValueError(f"max_wait_for_model must be > 0 seconds, got {max_wait_for_model}")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1 or None, got {max_concurrency}")
        self.model = model.strip()
        """The model id or endpoint URL, as given."""
        self.url = _resolve_url(self.model, base_url)
        """Where requests are sent."""
        self._url = httpx.URL(self.url)  # parsed once: parsing a URL costs ~30 µs a request
        self.max_wait_for_model = float(max_wait_for_model)
        self.max_retries = max_retries
        self._token = _resolve_token(token, self.url)
        self._policy = _policy or RetryPolicy()
        self._on_event = on_event

        # httpx.Headers masks Authorization in its repr.
        self._headers = httpx.Headers(
            {
                "User-Agent": f"sdclient/{__version__}",
                "Accept": "image/png",
                "Content-Type": "application/json",
            }
        )
        if headers:
            self._headers.update(headers)
        if self._token is not None:
            self._headers["Authorization"] = f"Bearer {self._token}"
        self._no_cache_headers = self._headers.copy()
        self._no_cache_headers["x-use-cache"] = "false"

        timeout_obj = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        if http_backend not in ("httpx", "aiohttp"):
            raise ValueError(f"http_backend must be 'httpx' or 'aiohttp', got {http_backend!r}")
        if http_client is None:
            pool = max_concurrency or 100
            transport: httpx.AsyncBaseTransport | None
            if http_backend == "aiohttp":
                from ._aiohttp import AiohttpTransport

                transport = AiohttpTransport(max_connections=pool)
            elif _environment_proxies():
                transport = None  # httpx's own transport: it applies the environment's proxies
            else:
                transport = ShardedTransport(max_connections=pool)
            self._http = httpx.AsyncClient(
                timeout=timeout_obj,
                limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
                transport=transport,
            )
            self._owns_http = True
            self._request_timeout: httpx.Timeout | None = None
        else:
            self._http = http_client
            self._owns_http = False
            # Keep the injected client's own timeout unless one was asked for.
            self._request_timeout = None if timeout is DEFAULT_TIMEOUT else timeout_obj

        self._usage = usage if usage is not None else UsageTracker()
        self._gate = ColdStartGate(self._policy, on_episode=self._record_cold_start)
        self._retrying = build_retrying(self._policy)
        self._semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._closed = False
        self._state: Literal["unknown", "ready", "loading", "unavailable"] = "unknown"
        self._state_message: str | None = None
        self._ready_at: float | None = None  # monotonic; while loading
        self._state_updated = time.time()

    def __repr__(self) -> str:
        return f"SDClient(model={self.model!r}, url={self.url!r}, authenticated={self._token is not None})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (unless it was passed in as ``http_client``)."""
        self._closed = True
        if self._owns_http:
            await self._http.aclose()

    @property
    def usage(self) -> UsageSnapshot:
        """Usage counted by this client's tracker (all models it counts, when shared)."""
        return self._usage.snapshot()

    @property
    def usage_tracker(self) -> UsageTracker:
        """The tracker this client counts into."""
        return self._usage

    @property
    def status(self) -> ModelStatus:
        """What the client knows of the model without sending anything."""
        eta = None
        if self._state == "loading" and self._ready_at is not None:
            eta = max(0.0, self._ready_at - time.monotonic())
        return ModelStatus(
            state=self._state, eta_s=eta, message=self._state_message, updated_at=self._state_updated
        )

    def _set_state(
        self,
        state: Literal["unknown", "ready", "loading", "unavailable"],
        message: str | None = None,
        eta: float | None = None,
    ) -> None:
        self._state = state
        self._state_message = message
        self._ready_at = time.monotonic() + eta if eta is not None else None
        self._state_updated = time.time()

    def _record_cold_start(self, seconds: float) -> None:
        self._usage.record(self.model, cold_start_waits=1, cold_start_wait_seconds=seconds)

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _emit(self, call: _Call, kind: Any, **fields: Any) -> None:
        if not call.hooks:
            return
        event = GenerationEvent(kind=kind, model=self.model, attempt=call.attempts, **fields)
        for hook in call.hooks:
            try:
                hook(event)
            except Exception:
                log.exception("on_event hook raised; ignoring it")

    async def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        extra_parameters: Mapping[str, Any] | None = None,
        use_cache: bool | None = None,
        on_event: EventHook | None = None,
    ) -> GeneratedImage:
        """Generate one image.

        Args:
            prompt: What to draw.
            negative_prompt: What to steer away from.
            width: Width in pixels.
            height: Height in pixels.
            num_inference_steps: Denoising steps.
            guidance_scale: Classifier-free guidance scale.
            seed: Random seed; when ``None`` the client draws one and sends it, so every image
                records the seed that made it.
            scheduler: A diffusers scheduler class name.
            extra_parameters: More entries for the request's ``parameters``.
            use_cache: ``False`` sends ``x-use-cache: false`` (no cached image for a repeated
                request).
            on_event: Called with this call's :class:`GenerationEvent` objects.

        Returns:
            The image, its size, format, seed, timings and request id.

        Raises:
            UsageLimitExceeded: A usage budget would be exceeded (nothing was sent).
            InvalidImage: The server answered 200 with something that is not an image.
            APIStatusError: The server refused (a subclass per status; see the error tree).
            ModelLoadingTimeout: The model was still loading after ``max_wait_for_model``.
            APIConnectionError: No complete answer after the retries (APITimeoutError for timeouts).
            pydantic.ValidationError: A parameter is out of range (a ``ValueError``).
        """
        request = GenerateRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=random.randrange(_SEED_LIMIT) if seed is None else seed,
            scheduler=scheduler,
            extra_parameters=dict(extra_parameters) if extra_parameters is not None else None,
        )
        return await self.generate_request(request, use_cache=use_cache, on_event=on_event)

    async def generate_request(
        self,
        request: GenerateRequest,
        *,
        use_cache: bool | None = None,
        on_event: EventHook | None = None,
    ) -> GeneratedImage:
        """Like :meth:`generate`, from a prepared :class:`GenerateRequest`.

        Args:
            request: Prompt and parameters.
            use_cache: ``False`` sends ``x-use-cache: false``.
            on_event: Called with this call's events.

        Returns:
            The image (see :meth:`generate`).

        Raises:
            SDClientError: See :meth:`generate`.
        """
        if self._closed:
            raise RuntimeError("this SDClient is closed; create a new one")
        if request.seed is None:
            request = request.model_copy(update={"seed": random.randrange(_SEED_LIMIT)})
        hooks = tuple(h for h in (self._on_event, on_event) if h is not None)
        call = _Call(hooks=hooks)
        characters = len(request.prompt) + len(request.negative_prompt or "")
        self._emit(call, "queued")
        image: GeneratedImage | None = None
        failure: BaseException | None = None
        try:
            with self._usage.reserve(images=1, characters=characters):
                try:
                    if self._semaphore is None:
                        image = await self._run(call, request, use_cache)
                    else:
                        async with self._semaphore:
                            image = await self._run(call, request, use_cache)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    self._usage.record(
                        self.model,
                        requests=call.attempts,
                        images=1 if image is not None else 0,
                        prompt_characters=characters if call.attempts else 0,
                        compute_seconds=(image.timings.compute_s or 0.0) if image is not None else 0.0,
                        retries=call.retries,
                        failure=type(failure).__name__ if isinstance(failure, SDClientError) else None,
                    )
        except SDClientError as exc:
            if failure is None:  # refused by the budget: nothing was sent
                self._usage.record(self.model, failure=type(exc).__name__)
            self._note_failure(exc)
            self._emit(call, "failed", message=str(exc))
            raise
        self._emit(call, "done")
        return image

    def _note_failure(self, exc: SDClientError) -> None:
        if isinstance(exc, ModelLoadingTimeout):
            return  # still loading, as far as we know
        if isinstance(exc, APIStatusError) and (
            exc.status_code in _UNAVAILABLE_STATUSES or exc.status_code >= 500
        ):
            self._set_state("unavailable", exc.message)
        elif isinstance(exc, APIConnectionError):
            self._set_state("unavailable", exc.message)

    async def _run(self, call: _Call, request: GenerateRequest, use_cache: bool | None) -> GeneratedImage:
        body = _json_bytes(request.to_payload())
        headers = self._no_cache_headers if use_cache is False else self._headers
        start = time.monotonic()
        deadline = start + self.max_wait_for_model
        cold_start_wait = 0.0

        def on_loading(eta: float | None, message: str) -> None:
            self._set_state("loading", message, eta)
            self._emit(call, "loading", eta_s=eta, message=message)

        async def send() -> httpx.Response:
            call.attempts += 1
            self._emit(call, "sending")
            return await self._send(body, headers)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            call.retries += 1
            exc = state.outcome.exception() if state.outcome else None
            delay = state.upcoming_sleep
            log.info("%s: retrying in %.2f s after: %s", self.model, delay, exc)
            self._emit(call, "retrying", delay_s=delay, message=str(exc))

        async def attempt() -> GeneratedImage:
            nonlocal cold_start_wait
            response, waited = await self._gate.run(
                send, deadline=deadline, model=self.model, on_loading=on_loading
            )
            cold_start_wait += waited
            return self._to_image(response, request, call, start, cold_start_wait)

        image = await call_with_retries(
            attempt,
            retrying=self._retrying,
            max_retries=self.max_retries,
            deadline=deadline,
            before_sleep=before_sleep,
        )
        self._set_state("ready")
        return image

    async def _send(self, body: bytes, headers: httpx.Headers) -> httpx.Response:
        """One POST; transport failures become :class:`APIConnectionError` (the one place)."""
        try:
            if self._request_timeout is None:
                return await self._http.post(self._url, content=body, headers=headers)
            return await self._http.post(
                self._url, content=body, headers=headers, timeout=self._request_timeout
            )
        except httpx.TimeoutException as exc:
            raise APITimeoutError(
                self._redact(
                    f"{type(exc).__name__}: no answer from {self.url} in time ({exc or 'timed out'})"
                ),
                model=self.model,
            ) from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(
                self._redact(f"{type(exc).__name__} calling {self.url}: {exc or 'connection failed'}"),
                model=self.model,
            ) from exc

    def _to_image(
        self,
        response: httpx.Response,
        request: GenerateRequest,
        call: _Call,
        start: float,
        cold_start_wait: float,
    ) -> GeneratedImage:
        # One pass over the raw headers instead of one scan per `Headers.get`.
        fields = {name.lower(): value for name, value in response.headers.raw}

        def header(name: bytes) -> str | None:
            value = fields.get(name)
            return None if value is None else value.decode("latin-1")

        request_id = header(b"x-request-id")
        if response.status_code >= 300 or response.status_code < 200:
            message = self._redact(
                error_message_from_body(
                    response.content, header(b"content-type"), reason=response.reason_phrase
                )
            )
            raise make_status_error(
                response.status_code,
                message,
                model=self.model,
                request_id=request_id,
                retry_after=parse_retry_after(header(b"retry-after"), cap=self._policy.max_retry_after),
            )
        data = response.content
        content_type = header(b"content-type")
        fmt = sniff(data)
        if fmt is None:
            snippet = self._redact(error_message_from_body(data[:2000], content_type, reason="empty body"))
            raise InvalidImage(
                f"the server answered {response.status_code} with {content_type or 'no Content-Type'} "
                f"but the body ({len(data)} bytes) is not a PNG, JPEG or WebP image: {snippet}",
                model=self.model,
                content_type=content_type,
                request_id=request_id,
            )
        if not is_complete(fmt, data):
            # Cut short in transit (no Content-Length to catch it): transient, like a reset.
            raise APIConnectionError(
                f"truncated {fmt.upper()} body from {self.url} ({len(data)} bytes)", model=self.model
            )
        try:
            width, height = image_size(fmt, data)
        except ValueError as exc:
            raise InvalidImage(
                f"the server answered {response.status_code} with a {fmt.upper()} header that "
                f"cannot be decoded: {exc}",
                model=self.model,
                content_type=content_type,
                request_id=request_id,
            ) from exc
        compute = header(b"x-compute-time")
        try:
            compute_s = float(compute) if compute is not None else None
        except ValueError:
            compute_s = None
        return GeneratedImage(
            data=data,
            content_type=f"image/{fmt}",
            format=fmt,
            width=width,
            height=height,
            request=request,
            model=self.model,
            timings=Timings(
                total_s=time.monotonic() - start, compute_s=compute_s, cold_start_wait_s=cold_start_wait
            ),
            attempts=call.attempts,
            request_id=request_id,
            compute_type=header(b"x-compute-type"),
            model_sha=header(b"x-sha"),
        )

    @overload
    async def generate_many(
        self,
        items: Iterable[str | GenerateRequest],
        *,
        concurrency: int = 4,
        return_exceptions: Literal[False] = False,
    ) -> list[GeneratedImage]: ...

    @overload
    async def generate_many(
        self,
        items: Iterable[str | GenerateRequest],
        *,
        concurrency: int = 4,
        return_exceptions: Literal[True],
    ) -> list[GeneratedImage | SDClientError]: ...

    async def generate_many(
        self,
        items: Iterable[str | GenerateRequest],
        *,
        concurrency: int = 4,
        return_exceptions: bool = False,
    ) -> Sequence[GeneratedImage | SDClientError]:
        """Generate several images, at most ``concurrency`` at a time; results in input order.

        Args:
            items: Prompts, or :class:`GenerateRequest` objects for full control.
            concurrency: Calls in flight at once (also bounded by ``max_concurrency``).
            return_exceptions: Put each failure (an :class:`SDClientError`) in the result list
                instead of raising the first one (the other calls are then cancelled).

        Returns:
            One entry per item, in order.

        Raises:
            SDClientError: The first failure, when ``return_exceptions`` is false.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        requests = [GenerateRequest(prompt=item) if isinstance(item, str) else item for item in items]
        slots = asyncio.Semaphore(concurrency)

        async def one(request: GenerateRequest) -> GeneratedImage | SDClientError:
            async with slots:
                try:
                    return await self.generate_request(request)
                except SDClientError as exc:
                    if return_exceptions:
                        return exc
                    raise

        tasks = [asyncio.ensure_future(one(request)) for request in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
