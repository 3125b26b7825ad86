"""``SDClient``: the async text-to-image client."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, overload
from urllib.parse import urlsplit

import httpx
import tenacity

from ._coldstart import ColdStartGate
from ._constants import (
    CANCEL_TIMEOUT,
    DEFAULT_MAX_WAIT_FOR_MODEL,
    DEFAULT_SCALE_UP_TIMEOUT,
    DEFAULT_TIMEOUT,
    ENDPOINT_HOST_SUFFIX,
)
from ._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    InvalidImage,
    JobFailed,
    JobTimeout,
    ModelLoadingTimeout,
    ModelNotFound,
    ProviderNotAvailable,
    SDClientError,
    make_status_error,
)
from ._logmask import forget_token, mask_token
from ._models import GeneratedImage, GenerateRequest, GenerationEvent, ImageFormat, ModelStatus, Timings
from ._providers import (
    PROVIDERS,
    Failed,
    ImageBytes,
    ImageUrl,
    Job,
    Pending,
    Provider,
    ProviderError,
    ProviderMapping,
    ProviderName,
    Route,
    parse_mapping,
)
from ._retry import RetryPolicy, call_with_retries, parse_retry_after
from ._usage import UsageSnapshot, UsageTracker
from ._version import __version__
from .protocol import (
    HUB_ENDPOINT,
    HUB_ID,
    ROUTER_URL,
    Header,
    error_message_from_body,
    is_hf_host,
    resolve_token,
)

__all__ = ["Clock", "EventHook", "SDClient"]

log = logging.getLogger("sdclient")

EventHook = Callable[[GenerationEvent], None]
"""Receives :class:`GenerationEvent` objects; called from the event loop, so it must not block."""

_T = TypeVar("_T")

Clock = Callable[[], float]
"""A monotonic clock in seconds (``time.monotonic``)."""

_SEED_LIMIT = 2**32  # seeds drawn by the client; any seed the protocol allows may be passed
_UNAVAILABLE_STATUSES = frozenset({401, 402, 403, 404, 410})
_FORMATS: dict[str, ImageFormat] = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
_ROUTED = frozenset(PROVIDERS)


def _check_url(name: str, value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"{name} must start with http:// or https://, got {value!r}")
    return value.rstrip("/")


def _direct_route(model: str, base_url: str | None, provider: str, router: str) -> Route | None:
    """The route of a URL, of a Hub id with ``base_url`` or on ``hf-inference``; ``None`` when the
    Hub must say (``auto`` or another provider)."""
    if model.startswith(("http://", "https://")):
        if base_url is not None:
            raise ValueError(
                "Pass either a full endpoint URL as `model` or a Hub model id with `base_url`, not both."
            )
        if provider not in ("auto", "hf-inference"):
            raise ValueError(
                f"provider={provider!r} applies to Hub model ids; a URL is one server of the "
                "hf-inference protocol (leave provider unset)"
            )
        return Route(provider="endpoint", model=model, provider_model=model, url=model)
    if "://" in model:
        raise ValueError(f"model URL must start with http:// or https://, got {model!r}")
    if not HUB_ID.match(model):
        raise ValueError(
            "model must be a Hub model id like 'user/sd-model' or a full http(s):// endpoint URL, "
            f"got {model!r}"
        )
    if base_url is not None:
        if provider not in ("auto", "hf-inference"):
            raise ValueError(
                "base_url is a server of the hf-inference protocol: it cannot be used with "
                f"provider={provider!r}"
            )
        base = _check_url("base_url", base_url)
        return Route(provider="hf-inference", model=model, provider_model=model, url=f"{base}/models/{model}")
    if provider == "hf-inference":
        return Route(
            provider="hf-inference",
            model=model,
            provider_model=model,
            url=f"{router}/hf-inference/models/{model}",
        )
    return None


@dataclass
class _Call:
    """Book-keeping of one ``generate`` call."""

    hooks: tuple[EventHook, ...]
    route: Route | None = None
    attempts: int = 0
    requests: int = 0
    retries: int = 0


class SDClient:
    """Async client for a text-to-image model: a Hub model on Inference Providers, a dedicated
    Endpoint, or any server of the hf-inference protocol.

    It retries what is worth retrying, waits out cold starts (one shared wait per model, however
    many calls are waiting) and provider queues, raises typed errors, and counts usage.

    Args:
        model: A Hub model id (``"user/sd-model"``) or a full ``http(s)://`` endpoint URL, used as
            is (a dedicated Endpoint or any server of the hf-inference protocol).
        provider: For a Hub id: which Inference Provider serves it. ``"auto"`` (the default) asks
            the Hub once which providers serve the model (``inferenceProviderMapping``) and uses
            the first live one; a named provider must be listed there (``hf-inference`` is used
            without asking). See :attr:`route`.
        token: Sent as ``Authorization: Bearer``. Resolved in this order (first match wins): this
            argument, the ``HF_TOKEN`` environment variable, the token saved by ``hf auth login``.
            A discovered token is only sent to Hugging Face hosts (``*.huggingface.co``,
            ``*.huggingface.cloud``); an explicit one is sent to the model's server and the router,
            never to a provider's image host.
        base_url: A server of the hf-inference protocol that serves Hub ids at
            ``{base_url}/models/{model}`` (not allowed with a URL ``model`` or another provider).
        router_url: Hugging Face's router (``https://router.huggingface.co``); tests point it at a
            local fake.
        hub_url: The Hub (``https://huggingface.co``): provider mappings and LoRA weight URLs.
        timeout: Seconds (or an ``httpx.Timeout``) for each HTTP request.
        max_wait_for_model: Seconds one call may spend waiting (for a cold start, a provider queue,
            a server that refuses connections while it starts, and in back-off sleeps), counted
            from its first send.
        max_retries: Re-sends after transient failures; shorthand for ``retry.max_retries``.
        retry: The retry policy (:class:`RetryPolicy`: re-sends, back-off, probing and polling
            intervals).
        scale_up_timeout: Seconds a dedicated Endpoint scaled to zero is asked to hold the request
            (``X-Scale-Up-Timeout``) instead of answering 503. ``None``: sent to
            ``*.endpoints.huggingface.cloud`` URLs only, as ``min(300, max_wait_for_model)``; ``0``
            turns it off; a number sends it to any URL model.
        max_concurrency: At most this many calls send at once; others queue. ``None``: no limit.
        usage: Where to count usage (e.g. a shared, file-backed tracker); a fresh in-memory one
            by default.
        http_client: An ``httpx.AsyncClient`` to send with (not closed by :meth:`aclose`).
        http_backend: ``"httpx"`` (the default), or ``"aiohttp"``: httpx on aiohttp's connection pool
            (``pip install 'sdclient[aiohttp]'``), an opt-in for many requests in flight.
        headers: Extra headers for every request (e.g. ``{"X-HF-Bill-To": "my-org"}``).
        on_event: Called with every :class:`GenerationEvent` of every call.
        clock: The monotonic clock deadlines are measured on (tests pass a fake one with ``sleep``).
        sleep: Sleeps seconds of ``clock``.

    Raises:
        ValueError: A malformed model id or URL, or contradictory arguments.
        ImportError: ``http_backend="aiohttp"`` without the ``aiohttp`` extra installed.

    Example:
        ```python
        async with SDClient("user/flux-lora") as client:
            image = await client.generate("portrait of abraza man", seed=1234)
            print(client.route)  # Route(provider='fal-ai', ...)
            image.save("portrait.png")
        ```
    """

    def __init__(
        self,
        model: str,
        *,
        provider: ProviderName = "auto",
        token: str | None = None,
        base_url: str | None = None,
        router_url: str = ROUTER_URL,
        hub_url: str = HUB_ENDPOINT,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_wait_for_model: float = DEFAULT_MAX_WAIT_FOR_MODEL,
        max_retries: int | None = None,
        retry: RetryPolicy | None = None,
        scale_up_timeout: float | None = None,
        max_concurrency: int | None = None,
        usage: UsageTracker | None = None,
        http_client: httpx.AsyncClient | None = None,
        http_backend: Literal["httpx", "aiohttp"] = "httpx",
        headers: Mapping[str, str] | None = None,
        on_event: EventHook | None = None,
        clock: Clock | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_retries is not None and max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not max_wait_for_model > 0:
            raise ValueError(f"max_wait_for_model must be > 0 seconds, got {max_wait_for_model}")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1 or None, got {max_concurrency}")
        if provider != "auto" and provider not in _ROUTED:
            raise ValueError(f"provider must be 'auto' or one of {sorted(_ROUTED)}, got {provider!r}")
        if scale_up_timeout is not None and scale_up_timeout < 0:
            raise ValueError(f"scale_up_timeout must be >= 0 seconds or None, got {scale_up_timeout}")
        self.model = model.strip()
        """The model id or endpoint URL, as given."""
        self.provider: str = provider
        """The provider asked for (``auto`` unless one was named)."""
        self.router_url = _check_url("router_url", router_url)
        self.hub_url = _check_url("hub_url", hub_url)
        self._route = _direct_route(self.model, base_url, provider, self.router_url)
        self._explicit_token = token is not None
        self._token = resolve_token(token, self._route.url if self._route else self.router_url)
        self.max_wait_for_model = float(max_wait_for_model)
        policy = retry or RetryPolicy()
        if max_retries is not None:
            policy = dataclasses.replace(policy, max_retries=max_retries)
        self.retry = policy
        """The retry policy in use."""
        self._on_event = on_event
        if clock is None:
            import time

            clock = time.monotonic
        self._clock = clock
        self._sleep = sleep
        self._mappings: list[ProviderMapping] | None = None
        self._route_lock = asyncio.Lock()

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
            mask_token(self._token)  # in the HTTP libraries' log lines, while this client is open
        self._scale_up = self._scale_up_header(scale_up_timeout)

        timeout_obj = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        if http_backend not in ("httpx", "aiohttp"):
            raise ValueError(f"http_backend must be 'httpx' or 'aiohttp', got {http_backend!r}")
        if http_client is None:
            pool = max_concurrency or 100
            transport: httpx.AsyncBaseTransport | None = None
            if http_backend == "aiohttp":
                from ._aiohttp import AiohttpTransport

                transport = AiohttpTransport(max_connections=pool)
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
        self._gate = ColdStartGate(self.retry, on_episode=self._record_cold_start, clock=clock, sleep=sleep)
        self._semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._closed = False
        self._state: Literal["unknown", "ready", "loading", "unavailable"] = "unknown"
        self._state_message: str | None = None
        self._ready_at: float | None = None  # on self._clock; while loading
        self._state_updated = _wall_time()

    def _scale_up_header(self, scale_up_timeout: float | None) -> str | None:
        route = self._route
        if route is None or route.provider != "endpoint" or scale_up_timeout == 0:
            return None
        if scale_up_timeout is None:
            host = (urlsplit(route.url).hostname or "").lower().rstrip(".")
            if not host.endswith(ENDPOINT_HOST_SUFFIX):
                return None
            scale_up_timeout = min(DEFAULT_SCALE_UP_TIMEOUT, self.max_wait_for_model)
        return f"{scale_up_timeout:g}"

    def __repr__(self) -> str:
        return (
            f"SDClient(model={self.model!r}, provider={self.provider!r}, url={self.url!r}, "
            f"authenticated={self._token is not None})"
        )

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
        if not self._closed and self._token is not None:
            forget_token(self._token)
        self._closed = True
        if self._owns_http:
            await self._http.aclose()

    @property
    def route(self) -> Route | None:
        """Which provider, provider model id and URL the calls use (never the token); ``None``
        until the Hub was asked (the first call, or :meth:`resolve_route`)."""
        return self._route

    @property
    def url(self) -> str | None:
        """Where requests are POSTed (``None`` until the route is known)."""
        return self._route.url if self._route else None

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
            eta = max(0.0, self._ready_at - self._clock())
        return ModelStatus(
            state=self._state, eta_s=eta, message=self._state_message, updated_at=self._state_updated
        )

    # -- the route ---------------------------------------------------------------------------

    async def provider_mappings(self) -> list[ProviderMapping]:
        """The providers the Hub lists for the model (asked once per client, then cached).

        Returns:
            The text-to-image mappings, in the Hub's order.

        Raises:
            ModelNotFound: The Hub does not know the model.
            APIStatusError: The Hub refused (401, 403, ...).
            APIConnectionError: The Hub could not be reached.
        """
        if self._mappings is None:
            self._mappings = await asyncio.to_thread(self._fetch_mappings)
        return self._mappings

    def _fetch_mappings(self) -> list[ProviderMapping]:
        import httpx2  # what huggingface_hub sends with
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        token = self._token if self._explicit_token or is_hf_host(self.hub_url) else None
        try:
            info = HfApi(endpoint=self.hub_url, token=token or False).model_info(
                self.model, expand=["inferenceProviderMapping"]
            )
        except HfHubHTTPError as exc:
            response = exc.response
            status = response.status_code if response is not None else 0
            message = self._redact(
                error_message_from_body(response.content, response.headers.get("content-type"))
                if response is not None
                else str(exc)
            )
            if status == 404 or status == 401 and "Repository Not Found" in str(exc):
                raise ModelNotFound(
                    f"the Hub does not know {self.model} ({message})", status_code=404, model=self.model
                ) from None
            raise make_status_error(status or 502, f"asking the Hub: {message}", model=self.model) from None
        except (httpx2.TransportError, OSError) as exc:
            raise APIConnectionError(
                self._redact(f"cannot reach the Hub at {self.hub_url}: {exc}"), model=self.model
            ) from None
        return [m for m in parse_mapping(info.inference_provider_mapping) if m.task == "text-to-image"]

    async def resolve_route(self) -> Route:
        """The route calls take, asking the Hub the first time when it has to.

        Returns:
            The :attr:`route`.

        Raises:
            ProviderNotAvailable: No provider (or not the one named) serves the model.
            SDClientError: Asking the Hub failed (see :meth:`provider_mappings`).
        """
        if self._route is not None:
            return self._route
        async with self._route_lock:
            if self._route is None:
                self._route = self._pick_route(await self.provider_mappings())
        return self._route

    def _pick_route(self, mappings: list[ProviderMapping]) -> Route:
        usable = [m for m in mappings if m.provider in _ROUTED and m.status != "error"]
        live = [m for m in usable if m.status == "live"] or usable
        if self.provider == "auto":
            chosen = live[0] if live else None
        else:
            chosen = next((m for m in usable if m.provider == self.provider), None)
        if chosen is None:
            listed = ", ".join(f"{m.provider} ({m.status})" for m in mappings) or "none"
            wanted = "any provider this client supports" if self.provider == "auto" else self.provider
            raise ProviderNotAvailable(
                f"{self.model} is not served by {wanted} for text-to-image; the Hub lists: {listed}. "
                + (
                    f"Pass provider= one of {sorted({m.provider for m in usable})}."
                    if usable
                    else "Serve it on a dedicated Inference Endpoint and pass its URL."
                ),
                model=self.model,
                providers=[m.provider for m in usable],
            )
        if chosen.status == "staging":
            log.warning("%s is in staging at %s: meant for tests only", self.model, chosen.provider)
        adapter = PROVIDERS[chosen.provider]
        return Route(
            provider=chosen.provider,
            model=self.model,
            provider_model=chosen.provider_id,
            url=adapter.url(self.router_url, chosen),
            adapter_weights_path=chosen.adapter_weights_path if chosen.adapter == "lora" else None,
        )

    # -- state and events --------------------------------------------------------------------

    def _set_state(
        self,
        state: Literal["unknown", "ready", "loading", "unavailable"],
        message: str | None = None,
        eta: float | None = None,
    ) -> None:
        self._state = state
        self._state_message = message
        self._ready_at = self._clock() + eta if eta is not None else None
        self._state_updated = _wall_time()

    def _usage_key(self, route: Route | None) -> str:
        return route.usage_key if route is not None else self.model

    def _record_cold_start(self, seconds: float) -> None:
        self._usage.record(self._usage_key(self._route), cold_start_waits=1, cold_start_wait_seconds=seconds)

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _masked(self, response: httpx.Response) -> httpx.Response:
        """``response`` with every copy of the token in its headers, and in its body unless the
        body is an image, replaced by ``***``: before anything reads it (errors, the loading
        message and status, events, request ids, logs), and before any text is cut short."""
        token = self._token.encode() if self._token else b""
        if not token:
            return response
        raw = response.headers.raw
        in_headers = any(token in value for _, value in raw)
        is_image = response.headers.get("content-type", "").lower().startswith("image/")
        in_body = not is_image and token in response.content
        if not (in_headers or in_body):
            return response
        # httpx has already decoded the body: the new answer carries it as is.
        dropped = (b"content-length", b"content-encoding", b"transfer-encoding")
        headers = [(k, v.replace(token, b"***")) for k, v in raw if k.lower() not in dropped]
        content = response.content.replace(token, b"***") if in_body else response.content
        return httpx.Response(
            response.status_code, headers=headers, content=content, request=response.request
        )

    def _emit(self, call: _Call, kind: Any, **fields: Any) -> None:
        if not call.hooks:
            return
        event = GenerationEvent(kind=kind, model=self.model, attempt=call.attempts, **fields)
        for hook in call.hooks:
            try:
                hook(event)
            except Exception:
                log.exception("on_event hook raised; ignoring it")

    # -- generating --------------------------------------------------------------------------

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
            extra_parameters: More entries for the request's parameters (provider-specific ones
                included).
            use_cache: ``False`` sends ``x-use-cache: false`` (no cached image for a repeated
                request).
            on_event: Called with this call's :class:`GenerationEvent` objects.

        Returns:
            The image, its size, format, seed, timings, provider and request id.

        Raises:
            UsageLimitExceeded: A usage budget would be exceeded (nothing was sent).
            ProviderNotAvailable: No provider (or not the one named) serves the model.
            InvalidImage: The server answered 200 with something that is not an image.
            APIStatusError: The server refused (a subclass per status; see the error tree).
            ModelLoadingTimeout: The model was still loading after ``max_wait_for_model``.
            JobFailed: The provider ran the job and it failed.
            JobTimeout: The provider's job was not done after ``max_wait_for_model`` (it was
                cancelled where the provider allows it).
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
        call = _Call(hooks=hooks, route=self._route)
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
                    compute = 0.0
                    if image is not None:
                        # What the server reported (0 for a cache hit), else the measured time
                        # of the answered request: never 0 s for want of a header.
                        reported = image.timings.compute_s
                        compute = reported if reported is not None else image.timings.request_s
                    self._usage.record(
                        self._usage_key(call.route),
                        requests=call.requests,
                        images=1 if image is not None else 0,
                        prompt_characters=characters if call.requests else 0,
                        compute_seconds=compute,
                        retries=call.retries,
                        failure=type(failure).__name__ if isinstance(failure, SDClientError) else None,
                    )
        except SDClientError as exc:
            if failure is None:  # refused by the budget: nothing was sent
                self._usage.record(self._usage_key(call.route), failure=type(exc).__name__)
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
        elif isinstance(exc, APIConnectionError | ProviderNotAvailable):
            self._set_state("unavailable", str(exc))

    def _headers_for(self, route: Route, adapter: Provider, use_cache: bool | None) -> httpx.Headers:
        headers = self._headers.copy()
        if adapter.json_answer:
            headers["Accept"] = "application/json"
        headers.update(adapter.headers())
        if use_cache is False:
            headers[Header.USE_CACHE] = "false"
        if self._scale_up is not None:
            headers[Header.SCALE_UP_TIMEOUT] = self._scale_up
        return headers

    async def _run(self, call: _Call, request: GenerateRequest, use_cache: bool | None) -> GeneratedImage:
        start = self._clock()
        deadline = start + self.max_wait_for_model
        route = call.route = await self.resolve_route()
        adapter = PROVIDERS["hf-inference" if route.provider == "endpoint" else route.provider]
        body = _json_bytes(adapter.payload(request, route, self.hub_url))
        headers = self._headers_for(route, adapter, use_cache)
        cold_start_wait = 0.0

        def on_loading(eta: float | None, message: str) -> None:
            self._set_state("loading", message, eta)
            self._emit(call, "loading", eta_s=eta, message=message)

        async def send() -> httpx.Response:
            call.attempts += 1
            call.requests += 1
            self._emit(call, "sending")
            return await self._send("POST", route.url, headers, body)

        posted = start  # when the answered POST went out: the measured time counts from there

        async def attempt() -> GeneratedImage | ImageUrl | Job | ImageBytes | Failed:
            nonlocal cold_start_wait, posted
            sent = posted = self._clock()
            response, waited = await self._gate.run(
                send, deadline=deadline, model=self.model, on_loading=on_loading
            )
            cold_start_wait += waited
            if not adapter.json_answer:
                return self._to_image(response, request, call, start, cold_start_wait, sent, route)
            data = self._json(response, route.url)
            return self._provider_answer(lambda: adapter.answer(data, route, self.router_url))

        answer = await self._with_retries(call, attempt, deadline)
        if isinstance(answer, Job):
            answer, posted = await self._wait_for_job(call, adapter, answer, deadline)
        if isinstance(answer, Failed):
            raise JobFailed(self._redact(answer.message), model=self.model, provider=route.provider)
        if isinstance(answer, ImageUrl):
            answer = await self._fetch(call, answer.url, request, start, cold_start_wait, posted, deadline)
        if isinstance(answer, ImageBytes):
            answer = self._image(
                answer.data, None, request, call, start, cold_start_wait, posted, route, None, None
            )
        self._set_state("ready")
        return answer

    async def _with_retries(self, call: _Call, attempt: Callable[[], Awaitable[_T]], deadline: float) -> _T:
        """``attempt`` under the client's retry policy and clock, its re-sends counted in ``call``."""
        return await call_with_retries(
            attempt,
            policy=self.retry,
            deadline=deadline,
            before_sleep=self._before_sleep(call),
            clock=self._clock,
            sleep=self._sleep,
        )

    def _before_sleep(self, call: _Call) -> Callable[[tenacity.RetryCallState], None]:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            call.retries += 1
            exc = state.outcome.exception() if state.outcome else None
            delay = state.upcoming_sleep
            log.info("%s: retrying in %.2f s after: %s", self.model, delay, exc)
            self._emit(call, "retrying", delay_s=delay, message=str(exc))

        return before_sleep

    async def _send(
        self, method: str, url: str, headers: httpx.Headers | Mapping[str, str], body: bytes | None = None
    ) -> httpx.Response:
        """One request; transport failures become :class:`APIConnectionError`, and every answer
        enters through :meth:`_masked` (the one place for both)."""
        try:
            if self._request_timeout is None:
                response = await self._http.request(method, url, content=body, headers=headers)
            else:
                response = await self._http.request(
                    method, url, content=body, headers=headers, timeout=self._request_timeout
                )
            return self._masked(response)
        except httpx.TimeoutException as exc:
            raise APITimeoutError(
                self._redact(f"{type(exc).__name__}: no answer from {url} in time ({exc or 'timed out'})"),
                model=self.model,
                # A POST starts a generation; a GET (status, image download) starts nothing.
                sent=method == "POST" and not isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout),
            ) from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(
                self._redact(f"{type(exc).__name__} calling {url}: {exc or 'connection failed'}"),
                model=self.model,
                refused=isinstance(exc, httpx.ConnectError) and _is_refused(exc),
            ) from exc

    def _status_error(self, response: httpx.Response, *, image_url: bool = False) -> APIStatusError:
        headers = response.headers
        message = self._redact(
            error_message_from_body(
                response.content, headers.get("content-type"), reason=response.reason_phrase
            )
        )
        request_id = headers.get(Header.REQUEST_ID)
        retry_after = parse_retry_after(headers.get(Header.RETRY_AFTER), cap=self.retry.max_retry_after)
        if image_url and response.status_code < 500 and response.status_code not in (408, 429):
            # Not the model's fault nor the token's: the provider's image URL is gone or was never written.
            return APIStatusError(
                f"the provider's image URL answered {response.status_code}: {message}",
                status_code=response.status_code,
                model=self.model,
                request_id=request_id,
                hint="Generate again: provider image URLs expire",
            )
        return make_status_error(
            response.status_code, message, model=self.model, request_id=request_id, retry_after=retry_after
        )

    def _json(self, response: httpx.Response, url: str) -> Any:
        if not 200 <= response.status_code < 300:
            raise self._status_error(response)
        try:
            return response.json()
        except ValueError:
            raise InvalidImage(
                self._redact(
                    f"{url} answered {response.status_code} with something that is not JSON: "
                    + error_message_from_body(response.content[:2000], response.headers.get("content-type"))
                ),
                model=self.model,
                content_type=response.headers.get("content-type"),
                request_id=response.headers.get(Header.REQUEST_ID),
            ) from None

    def _provider_answer(self, read: Callable[[], _T]) -> _T:
        try:
            return read()
        except ProviderError as exc:
            raise InvalidImage(
                f"{self._route.provider if self._route else 'the provider'} answered in an "
                f"unexpected shape: {exc}",
                model=self.model,
                content_type="application/json",
                request_id=None,
            ) from None

    async def _get_json(self, call: _Call, url: str, deadline: float) -> Any:
        """GET a job's status or result on the router, with the common retries."""
        headers = {k: v for k, v in self._headers.items() if k.lower() != "content-type"}
        headers["Accept"] = "application/json"

        async def attempt() -> Any:
            call.requests += 1
            return self._json(await self._send("GET", url, headers), url)

        return await self._with_retries(call, attempt, deadline)

    async def _wait_for_job(
        self, call: _Call, adapter: Provider, job: Job, deadline: float
    ) -> tuple[ImageBytes | ImageUrl | Failed, float]:
        """Poll a provider's job until it is done; cancel it when the caller gives up.

        Returns:
            The answer, and when the job left the queue (as far as the polls saw).
        """
        started = generating_since = self._clock()
        interval = self.retry.poll_interval
        # Polls go out one interval after the previous one went out (not after its answer came
        # back), so the answers' round trips do not add up over a long queue.
        due = started + interval
        last: Pending | None = None
        done = False
        try:
            while True:
                now = self._clock()
                if due > deadline:
                    state = f" ({last.state}, position {last.position})" if last and last.position else ""
                    raise JobTimeout(
                        f"the {adapter.name} job was not done after {now - started:.1f} s{state}; "
                        "raise max_wait_for_model or try again later",
                        model=self.model,
                        provider=adapter.name,
                        waited_s=now - started,
                    )
                if due > now:
                    await self._sleep(due - now)
                due = max(due, self._clock()) + interval
                data = await self._get_json(call, job.poll_url, deadline)
                state_answer = self._provider_answer(functools.partial(adapter.poll, data))
                if isinstance(state_answer, Pending):
                    if state_answer.state == "queued":  # still waiting: the measured time starts later
                        generating_since = self._clock()
                    if state_answer != last:
                        kind = "queued" if state_answer.state == "queued" else "generating"
                        self._emit(call, kind, position=state_answer.position)
                        last = state_answer
                    continue
                done = True
                if state_answer is None:
                    if job.result_url is None:
                        raise InvalidImage(
                            f"{adapter.name} said the job is done but gave no result",
                            model=self.model,
                            content_type=None,
                            request_id=None,
                        )
                    result = await self._get_json(call, job.result_url, deadline)
                    return self._provider_answer(functools.partial(adapter.result, result)), generating_since
                return state_answer, generating_since
        except BaseException:
            if not done and job.cancel_url:
                await self._cancel(job)
            raise

    async def _cancel(self, job: Job) -> None:
        """Best effort: tell the provider to drop a job nobody waits for any more."""
        assert job.cancel_url is not None
        headers = {k: v for k, v in self._headers.items() if k.lower() != "content-type"}
        try:
            await asyncio.shield(
                asyncio.wait_for(
                    self._http.request(job.cancel_method, job.cancel_url, headers=headers), CANCEL_TIMEOUT
                )
            )
        except (httpx.HTTPError, TimeoutError, asyncio.CancelledError) as exc:
            log.info("%s: could not cancel the job: %s", self.model, self._redact(str(exc)))

    async def _fetch(
        self,
        call: _Call,
        url: str,
        request: GenerateRequest,
        start: float,
        cold_start_wait: float,
        measured_from: float,
        deadline: float,
    ) -> GeneratedImage:
        """GET the image a provider points at; our token goes only to Hugging Face hosts."""
        if not url.startswith(("http://", "https://")):
            raise InvalidImage(
                f"the provider's image URL is not http(s): {url[:100]!r}",
                model=self.model,
                content_type=None,
                request_id=None,
            )
        headers = {"User-Agent": self._headers["User-Agent"], "Accept": "image/png"}
        if self._token is not None and is_hf_host(url):
            headers["Authorization"] = f"Bearer {self._token}"
        route = call.route
        assert route is not None

        async def attempt() -> GeneratedImage:
            call.requests += 1
            response = await self._send("GET", url, headers)
            if not 200 <= response.status_code < 300:
                raise self._status_error(response, image_url=True)
            return self._to_image(response, request, call, start, cold_start_wait, measured_from, route)

        return await self._with_retries(call, attempt, deadline)

    def _to_image(
        self,
        response: httpx.Response,
        request: GenerateRequest,
        call: _Call,
        start: float,
        cold_start_wait: float,
        sent: float,
        route: Route,
    ) -> GeneratedImage:
        if not 200 <= response.status_code < 300:
            raise self._status_error(response)
        # One pass over the answer's headers (last value wins) rather than a search per name.
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in response.headers.raw
        }
        compute = headers.get(Header.COMPUTE_TIME)
        try:
            compute_s = float(compute) if compute is not None else None
        except ValueError:
            compute_s = None
        return self._image(
            response.content,
            headers.get("content-type"),
            request,
            call,
            start,
            cold_start_wait,
            sent,
            route,
            headers.get(Header.REQUEST_ID),
            compute_s,
            compute_type=headers.get(Header.COMPUTE_TYPE),
            model_sha=headers.get(Header.SHA),
        )

    def _image(
        self,
        data: bytes,
        content_type: str | None,
        request: GenerateRequest,
        call: _Call,
        start: float,
        cold_start_wait: float,
        sent: float,
        route: Route,
        request_id: str | None,
        compute_s: float | None,
        *,
        compute_type: str | None = None,
        model_sha: str | None = None,
    ) -> GeneratedImage:
        """Image bytes checked: the format and size from the header (Pillow's ``Image.open``, which
        decodes nothing: a full decode would cost more than the rest of a call), completeness from
        the format's end marker (a body cut short in transit is transient, like a reset)."""
        from PIL import Image, UnidentifiedImageError

        fmt: ImageFormat | None
        try:
            with Image.open(io.BytesIO(data)) as header:
                fmt = _FORMATS.get(header.format or "")
                width, height = header.size
            if fmt is not None and not _is_complete(fmt, data):
                raise OSError("image file is truncated: no end marker")
        except UnidentifiedImageError:
            fmt = None
        except (OSError, SyntaxError, ValueError) as exc:
            if "truncated" in str(exc) or isinstance(exc, EOFError):
                raise APIConnectionError(
                    f"truncated image body from {route.url} ({len(data)} bytes)", model=self.model
                ) from exc
            raise InvalidImage(
                f"the server sent an image that cannot be decoded: {exc}",
                model=self.model,
                content_type=content_type,
                request_id=request_id,
            ) from exc
        if fmt is None:
            snippet = self._redact(error_message_from_body(data[:2000], content_type, reason="empty body"))
            raise InvalidImage(
                f"the server answered with {content_type or 'no Content-Type'} but the body "
                f"({len(data)} bytes) is not a PNG, JPEG or WebP image: {snippet}",
                model=self.model,
                content_type=content_type,
                request_id=request_id,
            )
        now = self._clock()
        return GeneratedImage(
            data=data,
            content_type=f"image/{fmt}",
            format=fmt,
            width=width,
            height=height,
            request=request,
            model=self.model,
            provider=route.provider,
            timings=Timings(
                total_s=now - start,
                compute_s=compute_s,
                cold_start_wait_s=cold_start_wait,
                request_s=now - sent,
            ),
            attempts=call.attempts,
            request_id=request_id,
            compute_type=compute_type,
            model_sha=model_sha,
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


_END_MARKERS: dict[ImageFormat, bytes] = {"png": b"IEND\xaeB`\x82", "jpeg": b"\xff\xd9"}
_END_SLACK = 64  # bytes some encoders write after the end marker


def _is_complete(fmt: ImageFormat, data: bytes) -> bool:
    """Whether an image ends where its format says: PNG's ``IEND`` chunk, JPEG's EOI marker,
    WebP's RIFF length."""
    if fmt == "webp":
        return len(data) >= 12 and int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return data.rfind(_END_MARKERS[fmt], max(0, len(data) - _END_SLACK)) != -1


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _wall_time() -> float:
    import time

    return time.time()


def _is_refused(exc: BaseException) -> bool:
    """Whether a connect error means nothing listens at the address (yet)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return True
        text = str(seen).lower()
        if "connection refused" in text or "errno 111" in text or "connect call failed" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False
