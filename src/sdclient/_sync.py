"""Blocking facade over :class:`SDClient` for scripts and notebooks.

The async client runs on a private event loop in a background thread; blocking calls submit to it
and wait. That works from plain scripts, from any thread, and from code that already runs an event
loop (a Jupyter notebook, or a thread while another loop runs), where ``asyncio.run`` would fail.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, Literal, Self, TypedDict, TypeVar, Unpack, overload

import httpx

from ._client import EventHook, SDClient
from ._constants import DEFAULT_MAX_RETRIES, DEFAULT_MAX_WAIT_FOR_MODEL, DEFAULT_TIMEOUT
from ._exceptions import SDClientError
from ._models import GeneratedImage, GenerateRequest, ModelStatus
from ._providers import ProviderName, Route
from ._retry import RetryPolicy
from ._usage import UsageSnapshot, UsageTracker

__all__ = ["ClientOptions", "GenerateOptions", "SyncSDClient", "generate_sync"]

T = TypeVar("T")


class ClientOptions(TypedDict, total=False):
    """Keyword arguments of :class:`SDClient` (see there)."""

    provider: ProviderName
    token: str | None
    base_url: str | None
    router_url: str
    hub_url: str
    timeout: float | httpx.Timeout
    max_wait_for_model: float
    max_retries: int | None
    retry: RetryPolicy | None
    scale_up_timeout: float | None
    max_concurrency: int | None
    usage: UsageTracker | None
    http_client: httpx.AsyncClient | None
    http_backend: Literal["httpx", "aiohttp"]
    headers: Mapping[str, str] | None
    on_event: EventHook | None


class GenerateOptions(TypedDict, total=False):
    """Keyword arguments of :meth:`SDClient.generate` (see there)."""

    negative_prompt: str | None
    width: int | None
    height: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    seed: int | None
    scheduler: str | None
    extra_parameters: Mapping[str, Any] | None
    use_cache: bool | None
    on_event: EventHook | None


class SyncSDClient:
    """Blocking twin of :class:`SDClient`: same arguments, same methods, no ``await``.

    ``on_event`` hooks run on the client's background thread.

    Args:
        model: A Hub model id or a full endpoint URL.
        **options: The keyword arguments of :class:`SDClient`.

    Example:
        ```python
        with SyncSDClient("user/sd-model") as client:
            client.generate("a red fox", seed=1).save("fox.png")
        ```
    """

    def __init__(self, model: str, **options: Unpack[ClientOptions]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sdclient-sync", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._client = self._run(self._create(model, options))
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _create(model: str, options: ClientOptions) -> SDClient:
        return SDClient(model, **options)  # created on the loop that will use it

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("this SyncSDClient is closed; create a new one")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("SyncSDClient cannot be called from its own on_event hook; use SDClient")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def __repr__(self) -> str:
        return f"Sync{self._client!r}"

    @property
    def model(self) -> str:
        """The model id or endpoint URL."""
        return self._client.model

    @property
    def url(self) -> str | None:
        """Where requests are POSTed (``None`` until the route is known)."""
        return self._client.url

    @property
    def route(self) -> Route | None:
        """See :attr:`SDClient.route`."""
        return self._client.route

    def resolve_route(self) -> Route:
        """See :meth:`SDClient.resolve_route`."""
        return self._run(self._client.resolve_route())

    @property
    def usage(self) -> UsageSnapshot:
        """See :attr:`SDClient.usage`."""
        return self._client.usage

    @property
    def status(self) -> ModelStatus:
        """See :attr:`SDClient.status`."""
        return self._client.status

    def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> GeneratedImage:
        """Generate one image; blocks until done. See :meth:`SDClient.generate`.

        Args:
            prompt: What to draw.
            **options: The keyword arguments of :meth:`SDClient.generate`.

        Returns:
            The image.

        Raises:
            SDClientError: See :meth:`SDClient.generate`.
        """
        return self._run(self._client.generate(prompt, **options))

    @overload
    def generate_many(
        self,
        items: Iterable[str | GenerateRequest],
        *,
        concurrency: int = 4,
        return_exceptions: Literal[False] = False,
    ) -> list[GeneratedImage]: ...

    @overload
    def generate_many(
        self,
        items: Iterable[str | GenerateRequest],
        *,
        concurrency: int = 4,
        return_exceptions: Literal[True],
    ) -> list[GeneratedImage | SDClientError]: ...

    def generate_many(
        self,
        items: Iterable[str | GenerateRequest],
        *,
        concurrency: int = 4,
        return_exceptions: bool = False,
    ) -> list[GeneratedImage] | list[GeneratedImage | SDClientError]:
        """Generate several images concurrently; blocks until all are done.

        See :meth:`SDClient.generate_many`.
        """
        items = list(items)
        if return_exceptions:
            return self._run(
                self._client.generate_many(items, concurrency=concurrency, return_exceptions=True)
            )
        return self._run(self._client.generate_many(items, concurrency=concurrency))

    def close(self) -> None:
        """Close the connection pool and stop the background thread. Safe to call twice."""
        if self._closed:
            return
        try:
            self._run(self._client.aclose())
        finally:
            self._closed = True
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def generate_sync(
    prompt: str,
    *,
    model: str,
    token: str | None = None,
    base_url: str | None = None,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    max_wait_for_model: float = DEFAULT_MAX_WAIT_FOR_MODEL,
    max_retries: int = DEFAULT_MAX_RETRIES,
    usage: UsageTracker | None = None,
    **options: Unpack[GenerateOptions],
) -> GeneratedImage:
    """Generate one image with a throw-away client; blocks until done.

    Works in scripts, threads and notebooks (the client runs on its own thread).

    Args:
        prompt: What to draw.
        model: A Hub model id or a full endpoint URL.
        token: See :class:`SDClient` (argument, then ``HF_TOKEN``, then ``hf auth login``).
        base_url: See :class:`SDClient`.
        timeout: See :class:`SDClient`.
        max_wait_for_model: See :class:`SDClient`.
        max_retries: See :class:`SDClient`.
        usage: See :class:`SDClient`.
        **options: The keyword arguments of :meth:`SDClient.generate`.

    Returns:
        The image.

    Raises:
        SDClientError: See :meth:`SDClient.generate`.

    Example:
        ```python
        image = sdclient.generate_sync("a red fox", model="user/sd-model", seed=7)
        image.save("fox.png")
        ```
    """
    with SyncSDClient(
        model,
        token=token,
        base_url=base_url,
        timeout=timeout,
        max_wait_for_model=max_wait_for_model,
        max_retries=max_retries,
        usage=usage,
    ) as client:
        return client.generate(prompt, **options)
