"""Generation behind the routes: cache, coalescing of identical calls, the admission queue, and the
progress events a streaming page sees.

One upstream call is a *flight*. Requests that carry an explicit seed and the same parameters join
the flight already in the air instead of starting another (100 identical seeded requests make one
upstream call), and once it lands its image is cached for repeats. Requests without a seed always
get their own flight: the client draws a fresh seed for each.

Progress events of a flight, in the order a page sees them:

- `queued {"position"}`: 0 when a slot was free, else the place in line (1 = next); again while
  the job waits in an Inference Provider's queue (its place there, `null` when not told);
- `loading {"eta_s"}`: the model is cold; sent when the wait starts and whenever the ETA moves;
- `generating {}`: a request went to a model believed to be ready, or the provider started the job;

then the route sends `image` or `error`. A request that joins a flight in the air first receives
the events the flight already sent.

A flight stops (leaves the queue, or its upstream call is cancelled) once no request waits for it
any more: the visitors closed their tabs. A flight that other instances may follow goes on.

With a shared store (Redis) the flight is shared by every instance: the first instance to claim
the request's fingerprint calls upstream and writes the flight's events and outcome to a log in
the store; the others follow that log. A follower whose leader vanished without an outcome (its
process died) claims the flight itself once the leader's lease has run out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import sdclient
from sdclient import Timings

from .admission import AdmissionQueue
from .errors import (
    ProxyError,
    StoreUnavailable,
    bounded_seconds,
    error_body,
    error_from_body,
    from_client_error,
    redact,
)
from .schemas import GenerateBody
from .store import Store

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

FOLLOW_POLL_S = 1.0
"""A follower of another instance's flight re-reads its log at least this often."""

FLIGHT_LOG_TTL_S = 120.0
"""How long a shared flight's log (events and outcome) stays in the store after its last item."""

UPSTREAM_SLOTS = "upstream"
"""Name of the store's slots that cap upstream calls across instances."""


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
        """The client's image with its `Timings` (the same model) rounded to 0.1 ms."""
        rounded = {name: round(value, 4) for name, value in image.timings if isinstance(value, float)}
        return cls(
            data=image.data,
            content_type=image.content_type,
            seed=image.seed if image.seed is not None else 0,
            timings=image.timings.model_copy(update=rounded),
        )

    def as_cache_hit(self) -> GenerationResult:
        """The same image, with timings that say nothing was waited for (compute time kept)."""
        waited = {name: 0.0 for name in Timings.model_fields if name != "compute_s"}
        return GenerationResult(
            self.data, self.content_type, self.seed, self.timings.model_copy(update=waited)
        )

    def to_bytes(self) -> bytes:
        """One JSON line (type, seed, timings), then the image bytes: how the store keeps it."""
        meta = {"content_type": self.content_type, "seed": self.seed, "timings": self.timings.model_dump()}
        return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + self.data

    @classmethod
    def from_bytes(cls, blob: bytes) -> GenerationResult:
        """The inverse of `to_bytes`."""
        line, _, data = blob.partition(b"\n")
        meta = json.loads(line)
        return cls(data, meta["content_type"], meta["seed"], Timings(**meta["timings"]))


@dataclass
class _Flight:
    """One upstream call and the requests waiting for it."""

    listeners: list[EventListener] = field(default_factory=list)
    history: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    pending_generating: asyncio.TimerHandle | None = None
    task: asyncio.Task[GenerationResult] | None = None
    log: str | None = None
    """The shared log this flight writes its events to, when it leads a shared flight."""
    followed: bool = False
    """Whether the image came from another instance's flight."""
    key: str | None = None
    """The fingerprint other requests join it by (coalesced flights only)."""
    waiters: int = 0
    """Requests of this instance waiting for the flight's result."""
    cancellable: bool = True
    """Whether the call may stop once no request waits for it: not when requests of other
    instances may follow it (a seeded call shared through the store)."""

    def subscribe(self, listener: EventListener | None) -> None:
        if listener is None:
            return
        for name, data in self.history:
            listener(name, data)
        self.listeners.append(listener)

    def unsubscribe(self, listener: EventListener | None) -> None:
        if listener is not None and listener in self.listeners:
            self.listeners.remove(listener)

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


# Items of a shared flight's log: a tag byte, then an event (JSON), the result, or the error (JSON).
_EVENT, _RESULT, _ERROR = b"e", b"r", b"x"


class GenerationService:
    """Serves generate calls from the cache, a flight in the air, or a new upstream call.

    Args:
        client: The app's one `SDClient` (its pool, cold-start wait and usage are shared).
        store: Where the cache, shared flights and the global cap live.
        admission: Bounded concurrency and queue for this instance's upstream calls.
        cache_max_bytes: Bytes of images kept for seeded repeats (0 disables the cache).
        cache_ttl_s: Seconds an image stays cached after its last use.
        coalesce: Whether identical seeded requests share one upstream call.
        global_max_concurrency: Upstream calls in flight at once over every instance that
            shares the store (0: no cap beyond each instance's own).
        flight_lease_s: The longest one upstream call can take (retries and cold start
            included): a shared flight's claim, and a global slot, expire after it.
    """

    def __init__(
        self,
        client: sdclient.SDClient,
        *,
        store: Store,
        admission: AdmissionQueue,
        cache_max_bytes: int,
        cache_ttl_s: float = 3600.0,
        coalesce: bool = True,
        global_max_concurrency: int = 0,
        flight_lease_s: float = 600.0,
    ) -> None:
        self.client = client
        self.store = store
        self.admission = admission
        self.cache_max_bytes = cache_max_bytes
        self.cache_ttl_s = cache_ttl_s
        self.coalesce = coalesce
        self.global_max_concurrency = global_max_concurrency
        self.flight_lease_s = flight_lease_s
        self.upstream_calls = 0
        self.followed = 0
        self.abandoned = 0
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
            ProxyError: `Busy` when the queue is full, `StoreUnavailable`, or the translation of
                the client's error.
        """
        key = body.fingerprint() if body.seed is not None else None
        if key is not None and self.cache_max_bytes > 0:
            cached = await self._cache_get(key)
            if cached is not None:
                return GenerationResult.from_bytes(cached).as_cache_hit(), "cache"
        if key is not None and self.coalesce and (flight := self._flights.get(key)) is not None:
            flight.subscribe(listener)
            return await self._wait(flight, listener), "coalesced"

        flight = _Flight()
        flight.subscribe(listener)
        if key is not None and self.coalesce:
            flight.key = key
            flight.cancellable = not self.store.shared
            flight.task = asyncio.create_task(self._share(flight, body, key))
            self._flights[key] = flight
            flight.task.add_done_callback(lambda _: self._forget(flight))
        else:
            flight.task = asyncio.create_task(self._fly(flight, body))
        result = await self._wait(flight, listener)
        return result, "coalesced" if flight.followed else "upstream"

    async def _wait(self, flight: _Flight, listener: EventListener | None) -> GenerationResult:
        """The flight's result. A request that goes away meanwhile (a closed tab cancels it) stops
        listening; when it was the last one waiting, the call stops too, queued or running, and
        frees its slot. A call that other requests still wait for goes on (it is shielded), and so
        does one that other instances may follow."""
        assert flight.task is not None
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            flight.waiters -= 1
            flight.unsubscribe(listener)
            if flight.waiters == 0 and flight.cancellable and not flight.task.done():
                self._forget(flight)  # a request coming now starts a call of its own
                flight.task.cancel()
                self.abandoned += 1
            raise

    def _forget(self, flight: _Flight) -> None:
        if flight.key is not None and self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    async def _share(self, flight: _Flight, body: GenerateBody, key: str) -> GenerationResult:
        """Lead or follow the store's flight for `key` (only this instance's, with a memory store)."""
        if not self.store.shared:
            return await self._fly(flight, body, key)
        while True:
            flight_id = secrets.token_hex(8)
            try:
                leader = await self.store.put_new(
                    f"flight:{key}", flight_id.encode(), ttl_s=self.flight_lease_s
                )
            except StoreUnavailable:
                # The request was admitted (fail-open, or Redis went away since): make the image
                # without sharing the call with other instances rather than refuse it.
                logger.warning("store unavailable: a seeded call is not shared with other instances")
                return await self._fly(flight, body, key)
            if leader is None:
                flight.log = f"flightlog:{flight_id}"
                outcome = (
                    _ERROR + json.dumps({"status": 500, **error_body(ProxyError("Internal error."))}).encode()
                )
                try:
                    result = await self._fly(flight, body, key)
                    outcome = _RESULT + result.to_bytes()
                    return result
                except ProxyError as exc:
                    outcome = _ERROR + json.dumps({"status": exc.status_code, **error_body(exc)}).encode()
                    raise
                finally:
                    await self._finish(flight.log, key, outcome)
            followed = await self._follow(flight, key, leader.decode())
            if followed is not None:
                flight.followed = True
                self.followed += 1
                return followed

    async def _cache_get(self, key: str) -> bytes | None:
        """The cached image, or None; a store that cannot be reached is a miss."""
        try:
            return await self.store.cache_get(key, ttl_s=self.cache_ttl_s)
        except StoreUnavailable:
            logger.warning("store unavailable: cache not read")
            return None

    async def _finish(self, log: str, key: str, outcome: bytes) -> None:
        """Hand the outcome to the followers and free the claim (best effort: followers that miss
        it claim the flight themselves once the lease is over)."""
        try:
            await self.store.append(log, outcome, ttl_s=FLIGHT_LOG_TTL_S)
            await self.store.delete(f"flight:{key}")
        except ProxyError:
            logger.warning("could not share the outcome of a flight")

    async def _follow(self, flight: _Flight, key: str, flight_id: str) -> GenerationResult | None:
        """Relay another instance's flight; None when its leader vanished without an outcome."""
        log = f"flightlog:{flight_id}"
        seen = 0
        async with self.store.watch(log) as watch:
            while True:
                for item in await self.store.read(log, seen):
                    seen += 1
                    tag, payload = item[:1], item[1:]
                    if tag == _RESULT:
                        return GenerationResult.from_bytes(payload)
                    if tag == _ERROR:
                        detail = json.loads(payload)
                        raise error_from_body(detail.pop("status"), detail)
                    event = json.loads(payload)
                    flight.emit(event["event"], event["data"])
                if not await watch.wait(FOLLOW_POLL_S):
                    current = await self.store.get(f"flight:{key}")
                    if current is None or current.decode() != flight_id:
                        if not await self.store.read(log, seen):
                            return None

    def _emit(self, flight: _Flight, name: str, data: dict[str, Any]) -> None:
        flight.emit(name, data)
        if flight.log is not None:
            item = _EVENT + json.dumps({"event": name, "data": data}).encode()
            task = asyncio.create_task(self._log_event(flight.log, item))
            task.add_done_callback(lambda t: t.exception())

    async def _log_event(self, log: str, item: bytes) -> None:
        try:
            await self.store.append(log, item, ttl_s=FLIGHT_LOG_TTL_S)
        except ProxyError:
            logger.warning("could not share a progress event of a flight")

    @asynccontextmanager
    async def _global_slot(self) -> AsyncIterator[None]:
        """One of the store's `global_max_concurrency` upstream slots (a no-op when 0)."""
        if self.global_max_concurrency <= 0:
            yield
            return
        holder = secrets.token_hex(8)
        try:
            async with self.store.watch(UPSTREAM_SLOTS) as watch:
                while not await self.store.try_acquire(
                    UPSTREAM_SLOTS, holder, limit=self.global_max_concurrency, lease_s=self.flight_lease_s
                ):
                    await watch.wait(FOLLOW_POLL_S)
        except StoreUnavailable:
            logger.warning("store unavailable: upstream call made without the global cap")
            yield
            return
        try:
            yield
        finally:
            try:
                await self.store.release_slot(UPSTREAM_SLOTS, holder)
            except StoreUnavailable:
                logger.warning("store unavailable: a global slot is freed by its lease instead")

    async def _fly(self, flight: _Flight, body: GenerateBody, key: str | None = None) -> GenerationResult:
        loop = asyncio.get_running_loop()

        def on_client_event(event: sdclient.GenerationEvent) -> None:
            if event.kind == "loading":
                flight.cancel_pending()
                eta = None if event.eta_s is None else round(bounded_seconds(event.eta_s), 1)
                self._emit(flight, "loading", {"eta_s": eta})
            elif event.kind == "sending":
                status = self.client.status
                if status.state == "loading" and (status.eta_s or 0) > ETA_PASSED_S:
                    return  # a probe well before the estimate: the page keeps showing "loading"
                if status.state == "unknown":
                    if flight.pending_generating is None:
                        flight.pending_generating = loop.call_later(
                            UNKNOWN_STATE_GRACE_S, self._emit, flight, "generating", {}
                        )
                    return
                flight.cancel_pending()
                self._emit(flight, "generating", {})
            elif event.kind == "queued" and event.attempt > 0:
                # The job waits in a provider's queue (fal-ai, WaveSpeed, Replicate): `position` is
                # the jobs ahead of it there, so 1 is next in line as for the proxy's own queue.
                flight.cancel_pending()
                position = None if event.position is None else event.position + 1
                self._emit(flight, "queued", {"position": position})
            elif event.kind == "generating":
                flight.cancel_pending()
                self._emit(flight, "generating", {})

        # `body` was validated against the proxy's narrower bounds: handed on as it is, not again.
        request = sdclient.GenerateRequest.model_construct(**dict(body))
        try:
            async with (
                self.admission.slot(lambda position: self._emit(flight, "queued", {"position": position})),
                self._global_slot(),
            ):
                self.upstream_calls += 1
                try:
                    image = await self.client.generate_request(request, on_event=on_client_event)
                except sdclient.SDClientError as exc:
                    # The upstream's own words (masked) are the operator's; the page gets a summary.
                    logger.warning("upstream call failed: %s: %s", type(exc).__name__, redact(str(exc)))
                    raise from_client_error(exc) from exc
        finally:
            flight.cancel_pending()
        result = GenerationResult.from_image(image)
        if key is not None and self.cache_max_bytes > 0:
            try:
                await self.store.cache_put(
                    key, result.to_bytes(), ttl_s=self.cache_ttl_s, max_bytes=self.cache_max_bytes
                )
            except StoreUnavailable:  # the image is made: answer it, uncached
                logger.warning("store unavailable: image not cached")
        return result

    def status(self) -> sdclient.ModelStatus:
        """What the client knows of the model, without sending anything."""
        return self.client.status

    def describe(self) -> dict[str, Any]:
        """Counters for logs and `GET /usage`."""
        return {
            "upstream_calls": self.upstream_calls,
            "followed": self.followed,
            "abandoned": self.abandoned,
            "flights": len(self._flights),
            "at": time.time(),
        }
