"""Helpers of the proxy's tests: the proxy under uvicorn on a real socket, answer recording and the
token sentinel. Fixtures built on them are in conftest.py."""

from __future__ import annotations

import json
import logging
import socket
import tempfile
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def sdproxy_processes(count: int, model_url: str, **settings: Any) -> Iterator[list[str]]:
    """`count` processes of `sdproxy serve --model model_url`, each with `settings` as SDPROXY_*
    variables (limits off unless given); yield their URLs once every one answers `/healthz`."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("SDPROXY_") and k != "HF_TOKEN"}
    env.update({"SDPROXY_RATE_LIMIT_PER_MINUTE": "0", "SDPROXY_DAILY_QUOTA": "0", "NO_COLOR": "1"})
    env.update({"SDPROXY_UPSTREAM_TOKEN": SENTINEL, "SDPROXY_LOG_LEVEL": "WARNING"})
    env.update({f"SDPROXY_{name.upper()}": str(value) for name, value in settings.items()})
    ports = [_free_port() for _ in range(count)]
    command = [sys.executable, "-m", "proxy.cli", "serve", "--model", model_url, "--port"]
    logs = [tempfile.TemporaryFile("w+") for _ in ports]  # a file: a full pipe would block a process
    processes = [
        subprocess.Popen([*command, str(port)], env=env, stderr=log)
        for port, log in zip(ports, logs, strict=True)
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        deadline = time.monotonic() + 30
        for url, process in zip(urls, processes, strict=True):
            while True:
                if process.poll() is not None:
                    raise RuntimeError("sdproxy serve exited; see its log above")
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("sdproxy serve did not start")
                time.sleep(0.05)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process, log in zip(processes, logs, strict=True):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.seek(0)
            text = log.read()
            log.close()
            sys.stderr.write(text[-4000:])  # shown by pytest when the test fails
            assert SENTINEL not in text, "the token appears in a log line"
