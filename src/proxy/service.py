"""Generation behind the routes: cache, coalescing of identical calls, the admission queue, and the
progress events a streaming page sees.

One upstream call is a *flight*. Requests that carry an explicit seed and the same parameters join
the flight already in the air instead of starting another (100 identical seeded requests make one
upstream call), and once it lands its image is cached for repeats. Requests without a seed always
get their own flight: the client draws a fresh seed for each.

Progress events of a flight, in the order a page sees them:

- `queued {"position"}`: 0 when a slot was free, else the place in line (1 = next);
- `loading {"eta_s"}`: the model is cold; sent when the wait starts and whenever the ETA moves;
- `generating {}`: a request went to a model believed to be ready;

then the route sends `image` or `error`. A request that joins a flight in the air first receives
the events the flight already sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sdclient

from .admission import AdmissionQueue
from .cache import ImageCache
from .errors import from_client_error
from .schemas import GenerateBody, Timings

__all__ = ["EventListener", "GenerationResult", "GenerationService"]

logger = logging.getLogger("proxy.service")

EventListener = Callable[[str, dict[str, Any]], None]
"""Receives `(event name, data)` for `queued`, `loading` and `generating`."""

UNKNOWN_STATE_GRACE_S = 0.3
"""Before the first answer the model's state is unknown: `generating` waits this long for a
possible `loading` answer, so a cold start does not first show "generating" and then "loading"."""


ETA_PASSED_S = 0.5
"""A request sent while loading, with less than this left of the server's estimate, is expected to
generate: the page is told `generating` (and `loading` again if the model turns out not ready)."""


@dataclass(frozen=True)
class GenerationResult:
    """One image, ready to be answered (or cached)."""

    data: bytes
    content_type: str
    seed: int
    timings: Timings

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @classmethod
    def from_image(cls, image: sdclient.GeneratedImage) -> GenerationResult:
        timings = image.timings
        return cls(
            data=image.data,
            content_type=image.content_type,
            seed=image.seed if image.seed is not None else 0,
            timings=Timings(
                total_s=round(timings.total_s, 4),
                compute_s=None if timings.compute_s is None else round(timings.compute_s, 4),
                cold_start_wait_s=round(timings.cold_start_wait_s, 4),
            ),
        )

    def as_cache_hit(self) -> GenerationResult:
        """The same image, with timings that say nothing was waited for."""
        return GenerationResult(
            self.data,
            self.content_type,
            self.seed,
            Timings(total_s=0.0, compute_s=self.timings.compute_s, cold_start_wait_s=0.0),
        )


@dataclass
class _Flight:
    """One upstream call and the requests waiting for it."""

    listeners: list[EventListener] = field(default_factory=list)
    history: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    pending_generating: asyncio.TimerHandle | None = None
    task: asyncio.Task[GenerationResult] | None = None

    def subscribe(self, listener: EventListener | None) -> None:
        if listener is None:
            return
        for name, data in self.history:
            listener(name, data)
        self.listeners.append(listener)

    def emit(self, name: str, data: dict[str, Any]) -> None:
        if name == "generating" and self.history and self.history[-1][0] == "generating":
            return
        self.history.append((name, data))
        for listener in list(self.listeners):
            try:
                listener(name, data)
            except Exception:  # a listener must never break the flight
                logger.exception("event listener failed")

    def cancel_pending(self) -> None:
        if self.pending_generating is not None:
            self.pending_generating.cancel()
            self.pending_generating = None


class GenerationService:
    """Serves generate calls from the cache, a flight in the air, or a new upstream call.

    Args:
        client: The app's one `SDClient` (its pool, cold-start wait and usage are shared).
        admission: Bounded concurrency and queue for upstream calls.
        cache: Images of seeded requests (capacity 0 disables it).
        coalesce: Whether identical seeded requests share one upstream call.
    """

    def __init__(
        self,
        client: sdclient.SDClient,
        *,
        admission: AdmissionQueue,
        cache: ImageCache[GenerationResult],
        coalesce: bool = True,
    ) -> None:
        self.client = client
        self.admission = admission
        self.cache = cache
        self.coalesce = coalesce
        self.upstream_calls = 0
        self._flights: dict[str, _Flight] = {}

    async def generate(
        self, body: GenerateBody, *, listener: EventListener | None = None
    ) -> tuple[GenerationResult, str]:
        """Get the image for `body`.

        Args:
            body: The validated request.
            listener: Receives the progress events (for `/generate/stream`).

        Returns:
            The result and where it came from: `"upstream"`, `"cache"` or `"coalesced"`.

        Raises:
            ProxyError: `Busy` when the queue is full, or the translation of the client's error.
        """
        key = body.fingerprint() if body.seed is not None else None
        if key is not None and self.cache.max_bytes > 0:
            cached = self.cache.get(key)
            if cached is not None:
                return cached.as_cache_hit(), "cache"
        if key is not None and self.coalesce and (flight := self._flights.get(key)) is not None:
            flight.subscribe(listener)
            assert flight.task is not None
            return await asyncio.shield(flight.task), "coalesced"

        flight = _Flight()
        flight.subscribe(listener)
        flight.task = asyncio.create_task(self._fly(flight, body, key))
        if key is not None and self.coalesce:
            self._flights[key] = flight
            flight.task.add_done_callback(lambda _: self._flights.pop(key, None))
        # Shielded: a caller that goes away (a closed tab) does not cancel a call others may share.
        return await asyncio.shield(flight.task), "upstream"

    async def _fly(self, flight: _Flight, body: GenerateBody, key: str | None) -> GenerationResult:
        loop = asyncio.get_running_loop()

        def on_client_event(event: sdclient.GenerationEvent) -> None:
            if event.kind == "loading":
                flight.cancel_pending()
                flight.emit("loading", {"eta_s": None if event.eta_s is None else round(event.eta_s, 1)})
            elif event.kind == "sending":
                status = self.client.status
                if status.state == "loading" and (status.eta_s or 0) > ETA_PASSED_S:
                    return  # a probe well before the estimate: the page keeps showing "loading"
                if status.state == "unknown":
                    if flight.pending_generating is None:
                        flight.pending_generating = loop.call_later(
                            UNKNOWN_STATE_GRACE_S, flight.emit, "generating", {}
                        )
                    return
                flight.cancel_pending()
                flight.emit("generating", {})

        try:
            async with self.admission.slot(lambda position: flight.emit("queued", {"position": position})):
                self.upstream_calls += 1
                try:
                    image = await self.client.generate(
                        body.prompt,
                        negative_prompt=body.negative_prompt,
                        width=body.width,
                        height=body.height,
                        num_inference_steps=body.num_inference_steps,
                        guidance_scale=body.guidance_scale,
                        seed=body.seed,
                        on_event=on_client_event,
                    )
                except sdclient.SDClientError as exc:
                    raise from_client_error(exc) from exc
        finally:
            flight.cancel_pending()
        result = GenerationResult.from_image(image)
        if key is not None and self.cache.max_bytes > 0:
            self.cache.put(key, result)
        return result

    def status(self) -> sdclient.ModelStatus:
        """What the client knows of the model, without sending anything."""
        return self.client.status

    def describe(self) -> dict[str, Any]:
        """Counters for logs and `GET /usage`."""
        return {"upstream_calls": self.upstream_calls, "flights": len(self._flights), "at": time.time()}
