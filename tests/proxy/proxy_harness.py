"""Helpers of the proxy's tests: the proxy under uvicorn on a real socket, answer recording and the
token sentinel. Fixtures built on them are in conftest.py."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from proxy import Settings
from sdclient.testing import InferenceTestServer

# Fake tokens, written in two parts so that no secret scanner takes them for real ones.
SENTINEL = "hf" + "_SENTINEL0token0that0must0never0leak0xyz"
"""The proxy's token in every test: it is sent upstream, and must appear nowhere else."""

MODEL_ID = "test/model"


class RawRecords(logging.Handler):
    """Keeps every log record as raw text (message, extras and traceback, before any redaction)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        text = json.dumps({k: v for k, v in record.__dict__.items() if k != "exc_info"}, default=str)
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.lines.append(text + " " + record.getMessage())


def make_settings(upstream: InferenceTestServer, **overrides: Any) -> Settings:
    """Settings for a proxy in front of `upstream`: generous limits unless a test sets them."""
    values: dict[str, Any] = {
        "model": upstream.model_url(MODEL_ID),
        "upstream_token": SENTINEL,
        "rate_limit_per_minute": 0,
        "daily_quota": 0,
        "max_retries": 1,
        "upstream_timeout": 5.0,
        "max_wait_for_model": 5.0,
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Seen:
    """Everything the proxy answered during a test (checked for the token at the end)."""

    answers: list[str] = field(default_factory=list)

    def record(self, response: httpx.Response) -> None:
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
        self.answers.append(headers + "\n" + response.content.decode("latin-1"))

    def check(self) -> None:
        leaked = [answer for answer in self.answers if SENTINEL in answer]
        assert not leaked, f"the token appears in an answer: {leaked[0][:300]}"


@dataclass
class RunningProxy:
    url: str
    app: FastAPI
    seen: Seen

    def client(self, **kwargs: Any) -> httpx.Client:
        """A client of the proxy that records every answer for the token check."""
        return httpx.Client(
            base_url=self.url, timeout=30, event_hooks={"response": [self._record_sync]}, **kwargs
        )

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        return httpx.AsyncClient(
            base_url=self.url,
            timeout=30,
            limits=limits,
            event_hooks={"response": [self._record_async]},
            **kwargs,
        )

    def _record_sync(self, response: httpx.Response) -> None:
        response.read()
        self.seen.record(response)

    async def _record_async(self, response: httpx.Response) -> None:
        await response.aread()
        self.seen.record(response)

    @property
    def service(self) -> Any:
        return self.app.state.proxy.service


@contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    """Run `app` under uvicorn in a thread on 127.0.0.1:<free port>; yield its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=1,
        ws="none",
        proxy_headers=False,  # as `sdproxy serve`: the app reads X-Forwarded-For itself
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
