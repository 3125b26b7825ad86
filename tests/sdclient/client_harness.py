"""Constants shared by the client's tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sdclient import RetryPolicy, SDClient

MODEL_ID = "user/sd-model"

# Fake tokens, written in two parts so that no secret scanner takes them for real ones.
SENTINEL = "hf" + "_SENTINELtoken0123456789abcdefXYZ"
"""A token that must never show up in any output."""

FAST = RetryPolicy(
    initial_delay=0.01, max_delay=0.05, max_retry_after=2.0, probe_interval=0.1, min_probe_interval=0.02
)
"""Tenths of seconds instead of seconds, so the suite is fast."""

MakeClient = Callable[..., SDClient]
"""The `make_client` fixture: `make_client(model_url=None, **SDClient kwargs)`."""


class FakeClock:
    """A monotonic clock that only moves when something sleeps on it: timing tests without waiting.

    Pass it as ``SDClient(clock=fake, sleep=fake.sleep)``.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)
