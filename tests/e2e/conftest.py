"""Fixtures of the browser tests: the built React page, served by the real proxy under uvicorn on
127.0.0.1, in front of `sdclient.testing.InferenceTestServer`, driven by Debian's Chromium.

Playwright (pinned in pyproject.toml) drives `/usr/bin/chromium`; its own browser downloads
(`playwright install`) are never used. The tests are skipped, with the reason, when Chromium or
the built page (`examples/react-app/dist`) is missing; `scripts/test` provides both. With
`SDCLIENT_REQUIRE_BROWSER=1` (as `.ci/run` sets) a missing prerequisite fails the run instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from browser_harness import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DIST,
    MODEL_ID,
    SENTINEL,
    RecordingApp,
    Stack,
    missing_prerequisite,
    serve,
)

from sdclient.testing import InferenceTestServer, Reply


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the browser tests after every other test of the session.

    Playwright's sync API keeps an event loop running in the main thread from the first browser
    test to the end of the session (pytest-playwright's `playwright` fixture is session-scoped);
    any later test that calls `asyncio.run()` (the examples, the sync client, the CLIs) would then
    fail with "cannot be called from a running event loop".
    """
    browser = [item for item in items if item.get_closest_marker("browser") is not None]
    missing = missing_prerequisite()
    if browser and missing is not None and os.environ.get("SDCLIENT_REQUIRE_BROWSER") == "1":
        raise pytest.UsageError(f"SDCLIENT_REQUIRE_BROWSER=1 but the browser tests cannot run: {missing}")
    if browser:
        others = [item for item in items if item.get_closest_marker("browser") is None]
        items[:] = others + browser


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """pytest-playwright's launch arguments, pointed at Debian's Chromium."""
    return {
        **browser_type_launch_args,
        "executable_path": str(CHROMIUM),
        "args": [*browser_type_launch_args.get("args", []), *CHROMIUM_ARGS],
    }


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """No token or proxy settings from the environment or `hf auth login` reach the proxy."""
    for name in list(os.environ):
        if name.startswith("SDPROXY_") or name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(name)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)


@pytest.fixture
def upstream() -> Iterator[InferenceTestServer]:
    """The model server behind the proxy: PNG images, scriptable failures and cold starts."""
    with InferenceTestServer(
        model_id=MODEL_ID, default=Reply.image(format="png", compute_time=0.12)
    ) as server:
        yield server


@pytest.fixture
def start_stack(upstream: InferenceTestServer) -> Iterator[Callable[..., Stack]]:
    """`start_stack(**settings)`: the proxy (with the built page at /app/) under uvicorn."""
    from proxy import Settings, create_app

    with ExitStack() as stack:

        def start(**overrides: Any) -> Stack:
            values: dict[str, Any] = {
                "model": upstream.model_url(MODEL_ID),
                # The upstream is a local server, not a Hugging Face host: HF_TOKEN would not go there.
                "upstream_token": SENTINEL,
                "static_dir": DIST,
                "rate_limit_per_minute": 0,
                "daily_quota": 0,
                "max_retries": 1,
                "upstream_timeout": 10.0,
                "max_wait_for_model": 20.0,
                "_env_file": None,
            }
            values.update(overrides)
            settings = Settings(**values)
            recorder = RecordingApp(create_app(settings))
            url = stack.enter_context(serve(recorder))
            return Stack(url=url, upstream=upstream, recorder=recorder, settings=settings)

        yield start


@pytest.fixture
def stack(start_stack: Callable[..., Stack]) -> Stack:
    return start_stack()
