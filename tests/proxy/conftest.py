"""Fixtures of the proxy's tests: the test upstream, the proxy under uvicorn on a real socket, and
a guard that fails a test if the token shows up in any answer or log line."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from proxy_harness import MODEL_ID, SENTINEL, RawRecords, RunningProxy, Seen, make_settings, serve_app
from redis_harness import RedisServer

from proxy import create_app
from sdclient.testing import InferenceTestServer


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token or proxy settings from the environment, `.env` or `hf auth login`."""
    import os

    for name in list(os.environ):
        if name.startswith("SDPROXY_") or name == "HF_TOKEN":
            monkeypatch.delenv(name)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def logs() -> Iterator[RawRecords]:
    """Every log record of the test; fails the test if the token appears in one."""
    handler = RawRecords()
    root = logging.getLogger()
    names = ("", "proxy", "sdclient", "httpx", "httpcore", "uvicorn")
    levels = {name: logging.getLogger(name).level for name in names}
    root.addHandler(handler)
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    leaked = [line for line in handler.lines if SENTINEL in line]
    assert not leaked, f"the token appears in {len(leaked)} log line(s): {leaked[0][:300]}"


@pytest.fixture
def upstream() -> Iterator[InferenceTestServer]:
    with InferenceTestServer(model_id=MODEL_ID) as server:
        yield server


@pytest.fixture
def start_proxy(upstream: InferenceTestServer, logs: RawRecords) -> Iterator[Callable[..., RunningProxy]]:
    """`start_proxy(**settings)`: a proxy under uvicorn in front of `upstream`; every answer it
    gives during the test is checked for the token afterwards."""
    seen = Seen()
    with ExitStack() as stack:

        def start(**overrides: Any) -> RunningProxy:
            app = create_app(make_settings(upstream, **overrides))
            url = stack.enter_context(serve_app(app))
            return RunningProxy(url, app, seen)

        yield start
    seen.check()


@pytest.fixture
def proxy(start_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    """A proxy with the default test settings."""
    return start_proxy()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh `redis-server` on a free loopback port (see redis_harness.py for when it is skipped)."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()
