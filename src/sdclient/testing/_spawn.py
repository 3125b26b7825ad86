"""Run the test server in a child process (`python -m sdclient.testing`) and get its URL."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ._replies import ImageFormat

__all__ = ["spawn_server"]

_LISTENING = "listening on "
_SRC_DIR = str(Path(__file__).resolve().parents[2])


@contextmanager
def spawn_server(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    cold_start: float | None = None,
    delay: float | None = None,
    format: ImageFormat | None = None,
    size: int | None = None,
    model_id: str | None = None,
    startup_timeout: float = 30.0,
) -> Iterator[str]:
    """Start `python -m sdclient.testing` in a child process and yield its base URL.

    The child serves until the `with` block ends, then gets SIGTERM (SIGKILL if it has not
    exited within 5 s). Use it where the server must not share the test's process (and GIL):
    benchmarks, or services under test that run in their own process. The child answers every
    model request with an image (after the cold start, if any); `GET {url}/stats` returns its
    counters (`InferenceTestServer.stats`), e.g. how many requests arrived while it was loading.

    Example:
        ```python
        with spawn_server(delay=0.05, size=512) as url:
            ...  # POST f"{url}/models/user/model"
        ```

    Args:
        host: Address to listen on.
        port: Port; 0 picks a free one.
        cold_start: Answer 503 "loading" for this many seconds from the first request.
        delay: Seconds each image takes (a slow generation).
        format: Image format of the default reply (`jpeg` unless given).
        size: Default image side when the request gives no `width`/`height`.
        model_id: Model served at `/`.
        startup_timeout: Seconds to wait for the child to listen.

    Yields:
        The base URL, e.g. `"http://127.0.0.1:54321"`.

    Raises:
        RuntimeError: The child exited or did not listen within `startup_timeout`; the message
            holds the end of its stderr.
    """
    command = [sys.executable, "-m", "sdclient.testing", "--host", host, "--port", str(port)]
    if cold_start is not None:
        command += ["--cold-start", str(cold_start)]
    if delay is not None:
        command += ["--delay", str(delay)]
    if format is not None:
        command += ["--format", format]
    if size is not None:
        command += ["--size", str(size)]
    if model_id is not None:
        command += ["--model-id", model_id]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC_DIR, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"

    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=env, text=True
        )
        try:
            url = _read_url(process, startup_timeout, stderr)
            yield url
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(5.0)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()


def _read_url(process: subprocess.Popen[str], timeout: float, stderr: IO[bytes]) -> str:
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        line = ""
    if line.startswith(_LISTENING):
        return line[len(_LISTENING) :].strip()
    process.kill()
    process.wait()
    stderr.seek(0)
    tail = stderr.read()[-2000:].decode(errors="replace")
    raise RuntimeError(
        f"sdclient.testing server did not start (exit code {process.returncode}, first line {line!r}): {tail}"
    )
