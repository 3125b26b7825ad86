"""A real `redis-server` for the proxy's tests, on a free loopback port, started and stopped here.

Where Debian's `redis-server` is missing the Redis tests are skipped with the reason, except with
`SDCLIENT_REQUIRE_BROWSER=1` or `CI` set (as `.ci/run` does), where they fail instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field

import pytest

REDIS_SERVER = shutil.which("redis-server")


def require_redis() -> str:
    """The path of `redis-server`, or skip (fail in CI) with the reason."""
    if REDIS_SERVER is not None:
        return REDIS_SERVER
    reason = "redis-server is not installed (apt-get install redis-server; scripts/test does it as root)"
    if os.environ.get("SDCLIENT_REQUIRE_BROWSER") == "1" or os.environ.get("CI"):
        pytest.fail(f"the Redis tests are required here: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """One `redis-server` process; `kill()` and `start()` again on the same port."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = require_redis()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None
