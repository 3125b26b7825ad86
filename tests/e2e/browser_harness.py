"""Helpers of the browser tests: where Chromium and the built page are, the token sentinel, and the
proxy under uvicorn on a real socket. The fixtures built on them are in conftest.py."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdclient.testing import InferenceTestServer

CHROMIUM = Path("/usr/bin/chromium")
DIST = Path(__file__).resolve().parents[2] / "examples" / "react-app" / "dist"
MODEL_ID = "user/sd-raza"
# Fake tokens, written in two parts so that no secret scanner takes them for real ones.
SENTINEL = "hf" + "_SENTINEL0browser0token0must0never0reach0the0page"
"""The proxy's Hugging Face token in these tests: sent upstream, and nowhere near the browser."""

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def missing_prerequisite() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not CHROMIUM.exists():
        return (
            f"{CHROMIUM} is missing: `apt-get install -y --no-install-recommends chromium` "
            "(scripts/test does it when run as root)"
        )
    if not (DIST / "index.html").is_file():
        return f"{DIST} is not built: `cd examples/react-app && npm ci && npm run build`"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run an ASGI app under uvicorn in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="proxy-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the proxy under test did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class Answer:
    """One HTTP answer of the proxy, as it went on the wire (streams included, complete)."""

    method: str
    path: str
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def dump(self) -> str:
        """Status line, headers and body as one string, to search for things that must not be there."""
        head = "\n".join(f"{name}: {value}" for name, value in self.headers)
        return f"{self.status} {self.method} {self.path}\n{head}\n\n{self.body.decode('latin-1')}"


class RecordingApp:
    """An ASGI wrapper that keeps every answer the app sends.

    The browser cannot give back the body of a stream the page stopped reading (Chromium drops
    it), so the tests read what the proxy sent from here.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.answers: list[Answer] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answer = Answer(method=scope["method"], path=scope["path"])
        self.answers.append(answer)

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                answer.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
            elif message["type"] == "http.response.body":
                answer.body.extend(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, recording_send)


@dataclass
class Stack:
    """The proxy serving the built page, in front of the scripted upstream."""

    url: str
    upstream: InferenceTestServer
    recorder: RecordingApp = field(repr=False)
    settings: Any = field(repr=False)

    @property
    def app_url(self) -> str:
        return f"{self.url}/app/"

    def answers_to(self, method: str, path: str) -> list[Answer]:
        """The proxy's answers to `method path`, oldest first."""
        return [a for a in self.recorder.answers if a.method == method and a.path == path]
