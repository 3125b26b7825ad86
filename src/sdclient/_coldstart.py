"""One shared cold-start wait per model.

When a model is not loaded, the server answers ``503 {"error": "... is currently loading",
"estimated_time": 42.7}``. Twenty concurrent calls should not each poll the server every second:

* the first call that sees the loading answer closes the model's *gate* and becomes the *prober*;
* other calls for that model wait on the gate instead of sending (a call that was already in flight
  and also got a loading answer joins them);
* the prober sleeps until the server's estimate, then re-sends at most every ``probe_interval``
  (sooner if the server's new estimate says so, never faster than ``min_probe_interval``), so a
  model that becomes ready is noticed within about a second of the estimate;
* when a probe gets any answer that is not "loading" (an image, another error, a connection
  failure), the gate opens and the waiters send;
* each call has its own deadline (``max_wait_for_model``). A prober that runs out hands the role to
  a waiter, which probes at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx

from ._exceptions import ModelLoadingTimeout
from ._retry import RetryPolicy
from .protocol import Header, parse_loading

__all__ = ["ColdStartGate", "LoadingAnswer", "loading_answer"]


class LoadingAnswer:
    """A parsed ``503 loading`` answer."""

    __slots__ = ("estimated_time", "message", "request_id")

    def __init__(self, estimated_time: float | None, message: str, request_id: str | None) -> None:
        self.estimated_time = estimated_time
        self.message = message
        self.request_id = request_id


def loading_answer(response: httpx.Response) -> LoadingAnswer | None:
    """Recognise the cold-start answer of the protocol (:func:`sdclient.protocol.parse_loading`).

    Args:
        response: A response whose body was read.

    Returns:
        The estimate, message and request id, or ``None`` for any other answer.
    """
    info = parse_loading(response.status_code, response.content, response.headers.get("content-type"))
    if info is None:
        return None
    return LoadingAnswer(info.estimated_time, info.message, response.headers.get(Header.REQUEST_ID))


LoadingHook = Callable[[float | None, str], None]
"""Called with (seconds left or None, server message) when a wait starts or its ETA changes."""


class ColdStartGate:
    """Shares one cold-start wait among the concurrent calls of one model (see module docstring).

    Args:
        policy: Probe intervals.
        on_episode: Called once per loading episode with its length in seconds, when it ends.
        clock: Monotonic clock (seconds); tests pass a fake one together with ``sleep``.
        sleep: Sleeps that many seconds of ``clock``.
    """

    # An ETA that moves by less than this is not announced again.
    _ETA_EPSILON_S = 0.5

    def __init__(
        self,
        policy: RetryPolicy,
        on_episode: Callable[[float], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._sleep = sleep
        self._on_episode = on_episode
        self._loading = False
        self._since = 0.0
        self._ready_at: float | None = None  # monotonic time the server expects to be ready
        self._message = ""
        self._prober = False
        self._participants = 0
        self._changed: asyncio.Event | None = None
        self._watchers: set[LoadingHook] = set()

    @property
    def loading(self) -> bool:
        """Whether calls currently wait for the model to load."""
        return self._loading

    def _eta(self, now: float) -> float | None:
        return None if self._ready_at is None else max(0.0, self._ready_at - now)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _update(self, answer: LoadingAnswer, now: float) -> None:
        ready_at = None if answer.estimated_time is None else now + answer.estimated_time
        moved = (
            not self._loading
            or (ready_at is None) != (self._ready_at is None)
            or (
                ready_at is not None
                and self._ready_at is not None
                and abs(ready_at - self._ready_at) >= self._ETA_EPSILON_S
            )
        )
        if not self._loading:
            self._loading = True
            self._since = now
        self._ready_at = ready_at
        self._message = answer.message
        if moved:
            eta = self._eta(now)
            for hook in list(self._watchers):
                hook(eta, answer.message)

    def _open(self, now: float) -> None:
        if self._loading:
            self._loading = False
            self._ready_at = None
            if self._on_episode is not None:
                self._on_episode(now - self._since)
        self._notify()

    async def run(
        self,
        send: Callable[[], Awaitable[httpx.Response]],
        *,
        deadline: float,
        model: str,
        on_loading: LoadingHook,
    ) -> tuple[httpx.Response, float]:
        """Send through the gate, waiting out cold starts.

        Args:
            send: Sends the request once and returns the read response (or raises).
            deadline: ``clock()`` after which waiting gives up.
            model: For error messages.
            on_loading: This call's hook for "loading" progress.

        Returns:
            The first response that is not a loading answer, and the seconds this call waited.

        Raises:
            ModelLoadingTimeout: Still loading at the deadline.
        """
        waited = 0.0
        is_prober = False
        announced = False
        probes = 0
        last: LoadingAnswer | None = None
        self._participants += 1
        self._watchers.add(on_loading)
        try:
            while True:
                if not is_prober and self._loading:
                    # Wait while someone else probes; take over when the prober leaves.
                    if not announced:
                        on_loading(self._eta(self._clock()), self._message)
                        announced = True
                    while self._loading and self._prober:
                        now = self._clock()
                        if now >= deadline:
                            raise self._timeout(model, waited, self._eta(now), self._message, last)
                        if self._changed is None:
                            self._changed = asyncio.Event()
                        changed = self._changed
                        try:
                            await asyncio.wait_for(changed.wait(), deadline - now)
                        except TimeoutError:
                            pass
                        finally:
                            waited += self._clock() - now
                    if self._loading:  # the prober left without an answer: probe now
                        is_prober = self._prober = True
                try:
                    response = await send()
                except BaseException:
                    if is_prober:  # not a loading answer: let the waiters try for themselves
                        self._open(self._clock())
                    raise
                answer = loading_answer(response)
                now = self._clock()
                if answer is None:
                    self._open(now)
                    return response, waited
                last = answer
                self._update(answer, now)  # announces a new wait or a moved ETA to every caller
                announced = True
                if not is_prober:
                    if self._prober:
                        continue  # someone else probes: wait on the gate
                    is_prober = self._prober = True
                if now >= deadline:
                    raise self._timeout(model, waited, answer.estimated_time, answer.message, answer)
                delay = min(self._probe_delay(answer.estimated_time, first=probes == 0), deadline - now)
                probes += 1
                await self._sleep(delay)
                waited += self._clock() - now
        finally:
            self._participants -= 1
            self._watchers.discard(on_loading)
            if is_prober:
                self._prober = False
                self._notify()
            if self._loading and self._participants == 0:
                # Everybody gave up: end the episode; the next call probes at once.
                self._open(self._clock())

    def _probe_delay(self, estimate: float | None, *, first: bool) -> float:
        policy = self._policy
        if estimate is None:
            return policy.probe_interval
        if first:  # sleep until the server's estimate
            return max(estimate, policy.min_probe_interval)
        return min(max(estimate, policy.min_probe_interval), policy.probe_interval)

    @staticmethod
    def _timeout(
        model: str, waited: float, eta: float | None, message: str, answer: LoadingAnswer | None
    ) -> ModelLoadingTimeout:
        return ModelLoadingTimeout(
            message or "the model is still loading",
            model=model,
            waited_s=waited,
            estimated_time=eta,
            request_id=answer.request_id if answer else None,
        )
