"""`InferenceTestServer`: a local server of the text-to-image protocol, scripted to fail on purpose."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import TracebackType
from typing import Any, Self

from ..protocol import (
    MAX_IMAGE_SIDE,
    Header,
    InvalidBody,
    TextToImageInputs,
    header_is_true,
    loading_body,
    parse_text_to_image,
)
from ._http import HttpError, HttpRequest, abort_with_reset, read_request, response_head
from ._images import render
from ._replies import ReceivedRequest, Reply
from ._spawn import spawn_server

__all__ = ["InferenceTestServer"]

logger = logging.getLogger("sdclient.testing")

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


@lru_cache(maxsize=256)
def _model_sha(model: str) -> str:
    return hashlib.sha1(model.encode()).hexdigest()


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


class _InvalidRequest(Exception):
    def __init__(self, status: int, error: str | list[str]) -> None:
        super().__init__(str(error))
        self.status = status
        self.error = error


@dataclass(slots=True)
class _Payload:
    json: Any
    prompt: str
    parameters: dict[str, Any]


def _parse_payload(body: bytes) -> _Payload:
    """Check a request body like the real service (:func:`sdclient.protocol.parse_text_to_image`):
    400 for the body, 422 for the parameters."""
    try:
        parsed = parse_text_to_image(body, TextToImageInputs)
    except InvalidBody as exc:
        raise _InvalidRequest(exc.status, exc.error) from None
    data = json.loads(body)
    return _Payload(data, parsed.inputs, dict(data.get("parameters") or {}))


def _hold_seconds(headers: Mapping[str, str]) -> float:
    """How long the client asked the server to hold a request while the model loads."""
    if header_is_true(headers.get(Header.WAIT_FOR_MODEL)):
        return math.inf
    scale_up = headers.get(Header.SCALE_UP_TIMEOUT.lower())
    if scale_up is not None:
        try:
            return max(0.0, float(scale_up))
        except ValueError:
            return 0.0
    return 0.0


class InferenceTestServer:
    """A real HTTP server on 127.0.0.1 that answers the text-to-image protocol from a script.

    It runs its own event loop in a background thread, so it serves sync and async tests alike.
    Every request gets the next reply of the queue (`enqueue`), else `default` (an image). It can
    fail in ways a web framework cannot: truncated bodies, connection resets, requests never
    answered, and a cold start that answers 503 "loading" with a decreasing `estimated_time`.

    Routes: `POST /models/{owner}/{name}`, `POST /models/{name}` and `POST /` answer from the
    script; `GET /health` answers `{"ok": true}` and `GET /stats` the counters of `stats()`.
    A body that is not a JSON object with a string `inputs` gets a 400 `{"error": ...}`, and
    badly typed `parameters` a 422 with a list of errors, like the real service; neither
    consumes the script.

    Example:
        ```python
        with InferenceTestServer() as server:
            server.enqueue(Reply.loading(2.0), Reply.rate_limited(retry_after=1), Reply.image())
            client = SDClient(server.model_url("user/model"))
            ...
            assert [r.reply for r in server.requests] == ["loading", "rate_limited", "image"]
        ```

    Args:
        host: Address to listen on.
        port: Port to listen on; 0 picks a free one (read it back from `url` or `port`).
        model_id: The model served at `/` (named in "loading" messages).
        models: When set, `/models/{id}` answers 404 "Model {id} does not exist" for ids outside it.
        default: What answers once the queue is empty; `Reply.image()` when `None`.
        image_size: Image size used when neither the reply nor the request's `parameters` give
            one: a side in pixels or `(width, height)`.
        keep_records: Keep a `ReceivedRequest` per request in `requests`; turn it off for long
            benchmarks (the counters of `stats()` are kept either way).
        clock: The monotonic clock cold starts run on: tests pass a fake one and move it instead
            of sleeping.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        model_id: str = "test/model",
        models: Iterable[str] | None = None,
        default: Reply | None = None,
        image_size: int | tuple[int, int] = 64,
        keep_records: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if not all(isinstance(v, int) and 1 <= v <= MAX_IMAGE_SIDE for v in image_size):
            raise ValueError(f"image_size must be between 1 and {MAX_IMAGE_SIDE} pixels, got {image_size!r}")
        self.host = host
        self.model_id = model_id
        self.models: set[str] | None = set(models) if models is not None else None
        """Model ids served at `/models/...`; `None` serves every id."""
        self.image_size: tuple[int, int] = image_size
        self._initial_default = default or Reply.image()
        self._default = self._initial_default
        self._requested_port = port
        self._port: int | None = None

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[Reply] = deque()
        self._requests: list[ReceivedRequest] = []
        self._keep_records = keep_records
        self._received = 0
        self._replies: Counter[str] = Counter()
        self._cold_pending: float | None = None
        self._cold_until: float | None = None
        self._cold_hits = 0

        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._connections_opened = 0
        self._startup_error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Start serving in a background thread; returns once the socket is listening.

        Returns:
            The server itself.

        Raises:
            RuntimeError: The server is already running.
            OSError: The address cannot be bound (e.g. the port is taken).
        """
        if self._thread is not None:
            raise RuntimeError("InferenceTestServer is already running")
        ready = threading.Event()
        self._startup_error = None
        thread = threading.Thread(target=self._run, args=(ready,), name="sdclient-test-server", daemon=True)
        thread.start()
        if not ready.wait(_START_TIMEOUT):
            raise RuntimeError(f"InferenceTestServer did not start within {_START_TIMEOUT} s")
        if self._startup_error is not None:
            thread.join()
            raise self._startup_error
        self._thread = thread
        return self

    def stop(self) -> None:
        """Stop serving: close every connection (hanging ones included) and join the thread.

        Safe to call twice.
        """
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # the loop is already closed
            pass
        thread.join(_STOP_TIMEOUT)
        self._thread = None
        self._port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(
                        self._serve_connection,
                        self.host,
                        self._requested_port,
                        backlog=1024,
                        limit=64 * 1024,
                    )
                )
            except BaseException as exc:
                self._startup_error = exc
                return
            self._port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
        finally:
            ready.set()
            loop.close()
            self._loop = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    spawn = staticmethod(spawn_server)
    """`spawn_server`: run the server in a child process, as a context manager yielding its URL."""

    # -- addresses ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port listened on.

        Raises:
            RuntimeError: The server is not running.
        """
        if self._port is None:
            raise RuntimeError("InferenceTestServer is not running: use `with InferenceTestServer() as s:`")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. `"http://127.0.0.1:54321"` (no trailing slash)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def model_url(self, model_id: str) -> str:
        """URL of a model, e.g. `model_url("user/model")` -> `"http://127.0.0.1:54321/models/user/model"`."""
        return f"{self.url}/models/{model_id}"

    # -- script ------------------------------------------------------------------------------

    @property
    def default(self) -> Reply:
        """What answers when the queue is empty (an image unless set)."""
        return self._default

    @default.setter
    def default(self, reply: Reply) -> None:
        if not isinstance(reply, Reply):
            raise TypeError(f"default must be a Reply (e.g. Reply.image()), got {type(reply).__name__}")
        self._default = reply

    def enqueue(self, *replies: Reply) -> None:
        """Append replies to the queue; each answers one request, first in first out.

        Raises:
            TypeError: Something other than a `Reply` was given.
        """
        for reply in replies:
            if not isinstance(reply, Reply):
                kind = type(reply).__name__
                raise TypeError(f"enqueue takes Reply objects (e.g. Reply.image()), got {kind}")
        with self._lock:
            self._queue.extend(replies)

    @property
    def pending(self) -> int:
        """How many enqueued replies have not been used yet."""
        with self._lock:
            return len(self._queue)

    def cold_start(self, seconds: float, *, from_now: bool = False) -> None:
        """Simulate a model scaled to zero that loads for `seconds`.

        The load starts at the first request after this call (traffic wakes the model), or at
        once with `from_now=True`. Until it is over, every model request gets a 503
        `{"error": "Model <id> is currently loading", "estimated_time": <seconds left>}` and the
        queue is not consumed; afterwards the script answers again. A request sent with
        `x-wait-for-model: true` is held until the model is loaded, and one with
        `X-Scale-Up-Timeout: <s>` is held up to that long, as the real services do.
        `requests_while_loading` counts the requests that arrived during the load.

        Args:
            seconds: Duration of the load.
            from_now: Start the clock now instead of at the next request.

        Raises:
            ValueError: `seconds` is negative.
        """
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise ValueError(f"seconds must be a number >= 0, got {seconds!r}")
        with self._lock:
            self._cold_hits = 0
            if from_now:
                self._cold_pending = None
                self._cold_until = self._clock() + seconds
            else:
                self._cold_pending = float(seconds)
                self._cold_until = None

    @property
    def loading(self) -> bool:
        """Whether a cold start is pending or running."""
        with self._lock:
            if self._cold_pending is not None:
                return True
            return self._cold_until is not None and self._clock() < self._cold_until

    @property
    def requests_while_loading(self) -> int:
        """Model requests that arrived during the last cold start (the first 503 included).

        After the first 503, `requests_while_loading - 1` more requests reached the server
        before the model was ready: 0 for a client whose callers share one wait.
        """
        with self._lock:
            return self._cold_hits

    def reset(self) -> None:
        """Forget everything: the queue, the records, any cold start, and `default` goes back to
        the one given to the constructor."""
        with self._lock:
            self._queue.clear()
            self._requests.clear()
            self._received = 0
            self._replies.clear()
            self._cold_pending = None
            self._cold_until = None
            self._cold_hits = 0
            self._default = self._initial_default

    clear = reset
    """Alias of `reset`."""

    # -- records -----------------------------------------------------------------------------

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every request received so far, oldest first (a copy: safe to keep and iterate).

        Empty when the server was created with `keep_records=False`.
        """
        with self._lock:
            return list(self._requests)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[ReceivedRequest]:
        """Block until at least `count` requests were received (useful for `hang` and threads).

        Returns:
            The requests received so far.

        Raises:
            TimeoutError: Fewer than `count` arrived within `timeout` seconds.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: self._received >= count, timeout):
                raise TimeoutError(f"expected {count} requests within {timeout} s, received {self._received}")
            return list(self._requests)

    def _record(
        self, request: HttpRequest, received_at: float, reply: str, payload: Any, rid: str | None
    ) -> None:
        with self._changed:
            self._received += 1
            self._replies[reply] += 1
            if self._keep_records:
                record = ReceivedRequest(
                    method=request.method,
                    path=request.path,
                    headers=request.headers,
                    json=payload,
                    received_at=received_at,
                    reply=reply,
                    body=request.body,
                    request_id=rid,
                )
                self._requests.append(record)
            self._changed.notify_all()

    def stats(self) -> dict[str, Any]:
        """Counters of what the server saw, also served as JSON by `GET /stats` (for a server in
        another process).

        Returns:
            `{"requests": <all received, /stats excepted>, "replies": {<reply kind>: <count>},
            "requests_while_loading": ..., "loading": ..., "pending": ..., "connections_opened": ...}`
        """
        loading = self.loading
        with self._lock:
            return {
                "requests": self._received,
                "replies": dict(self._replies),
                "requests_while_loading": self._cold_hits,
                "loading": loading,
                "pending": len(self._queue),
                "connections_opened": self._connections_opened,
            }

    @property
    def connections_opened(self) -> int:
        """TCP connections accepted since the server started (shows whether clients reuse them)."""
        return self._connections_opened

    # -- serving -----------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._connections_opened += 1
        try:
            while True:
                try:
                    request = await read_request(reader, writer)
                except HttpError as exc:
                    body = _json_bytes({"error": exc.message})
                    head = response_head(exc.status, "application/json", len(body), {}, keep_alive=False)
                    writer.write(head + body)
                    await writer.drain()
                    return
                if request is None:
                    return
                if not await self._respond(request, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Only `_shutdown` cancels these tasks: end quietly (asyncio 3.11 would log it).
            return
        except Exception:
            logger.exception("sdclient.testing: unexpected error while serving a connection")
        finally:
            self._connections.discard(task)
            if not writer.transport.is_closing():
                writer.close()

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str | None,
        headers: Mapping[str, str],
        keep_alive: bool,
    ) -> bool:
        writer.write(response_head(status, content_type, len(body), headers, keep_alive=keep_alive) + body)
        await writer.drain()
        return keep_alive

    def _model_of(self, path: str) -> str | None:
        """The model id a path addresses (`model_id` for `/`), or `None` when it is no model route."""
        if path in ("/", ""):
            return self.model_id
        if path.startswith("/models/"):
            parts = path[len("/models/") :].rstrip("/").split("/")
            if 1 <= len(parts) <= 2 and all(parts):
                return "/".join(parts)
        return None

    async def _respond(
        self, request: HttpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; returns whether the connection stays open."""
        received_at = self._clock()
        keep_alive = request.keep_alive
        rid = uuid.uuid4().hex
        common = {"x-request-id": rid}

        if request.path == "/health":
            if request.method != "GET":
                self._record(request, received_at, "method_not_allowed", None, rid)
                body = _json_bytes({"error": f"Method {request.method} not allowed: use GET /health"})
                return await self._send(
                    writer, 405, body, "application/json", {"allow": "GET", **common}, keep_alive
                )
            self._record(request, received_at, "health", None, rid)
            return await self._send(writer, 200, b'{"ok": true}', "application/json", common, keep_alive)

        if request.path == "/stats" and request.method == "GET":
            return await self._send(
                writer, 200, _json_bytes(self.stats()), "application/json", {}, keep_alive
            )

        model = self._model_of(request.path)
        if model is None:
            self._record(request, received_at, "not_found", None, rid)
            body = _json_bytes({"error": f"Not Found: {request.path} (POST to /models/<model id> or /)"})
            return await self._send(writer, 404, body, "application/json", common, keep_alive)
        if request.method != "POST":
            self._record(request, received_at, "method_not_allowed", None, rid)
            body = _json_bytes({"error": f"Method {request.method} not allowed: POST a JSON body"})
            return await self._send(
                writer, 405, body, "application/json", {"allow": "POST", **common}, keep_alive
            )
        if request.path != "/" and self.models is not None and model not in self.models:
            self._record(request, received_at, "model_not_found", _loads_or_none(request.body), rid)
            body = _json_bytes({"error": f"Model {model} does not exist"})
            return await self._send(writer, 404, body, "application/json", common, keep_alive)

        # A cold start answers before anything else, like a gateway in front of a sleeping model.
        remaining = self._loading_remaining(received_at, count=True)
        if remaining is not None:
            hold = _hold_seconds(request.headers)
            if hold > 0:
                await asyncio.sleep(min(remaining, hold))
                remaining = self._loading_remaining(self._clock(), count=False)
        if remaining is not None:
            self._record(request, received_at, "loading", _loads_or_none(request.body), rid)
            body = _json_bytes(loading_body(model, remaining))
            return await self._send(writer, 503, body, "application/json", common, keep_alive)

        try:
            payload = _parse_payload(request.body)
        except _InvalidRequest as exc:
            self._record(request, received_at, "invalid_request", _loads_or_none(request.body), rid)
            body = _json_bytes({"error": exc.error})
            return await self._send(writer, exc.status, body, "application/json", common, keep_alive)

        with self._lock:
            reply = self._queue.popleft() if self._queue else self._default
        self._record(request, received_at, reply.kind, payload.json, rid)
        return await self._play(reply, payload, model, rid, reader, writer, keep_alive)

    def _loading_remaining(self, now: float, *, count: bool) -> float | None:
        """Seconds left of the cold start, or `None` when the model is ready."""
        with self._lock:
            if self._cold_pending is not None:
                self._cold_until = now + self._cold_pending
                self._cold_pending = None
                self._cold_hits = 0
            if self._cold_until is None:
                return None
            remaining = self._cold_until - now
            if remaining <= 0:
                return None
            if count:
                self._cold_hits += 1
            return round(remaining, 3)

    def _image_bytes(self, reply: Reply, payload: _Payload, model: str) -> bytes:
        width = reply.width or payload.parameters.get("width") or self.image_size[0]
        height = reply.height or payload.parameters.get("height") or self.image_size[1]
        return render(reply.format, width, height, payload.prompt, payload.parameters.get("seed"))

    async def _play(
        self,
        reply: Reply,
        payload: _Payload,
        model: str,
        rid: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keep_alive: bool,
    ) -> bool:
        """Perform a scripted reply; returns whether the connection stays open."""
        kind = reply.kind
        if kind == "image":
            if reply.delay:
                await asyncio.sleep(reply.delay)
            headers = {
                **({} if reply.compute_time is None else {Header.COMPUTE_TIME: f"{reply.compute_time:.3f}"}),
                "x-compute-type": "cpu",
                "x-compute-images": "1",
                "x-request-id": rid,
                "x-sha": _model_sha(model),
                **reply.headers,
            }
            body = self._image_bytes(reply, payload, model)
            return await self._send(writer, 200, body, reply.content_type, headers, keep_alive)
        if kind == "loading":
            body = _json_bytes(loading_body(model, reply.estimated_time))
            return await self._send(writer, 503, body, "application/json", {"x-request-id": rid}, keep_alive)
        if kind == "truncated":
            body = self._image_bytes(reply, payload, model)
            head = response_head(200, reply.content_type, len(body), {"x-request-id": rid}, keep_alive=True)
            writer.write(head + body[: len(body) // 2])
            await writer.drain()
            writer.close()
            return False
        if kind == "reset":
            abort_with_reset(writer)
            return False
        if kind == "hang":
            # Read (and drop) whatever comes until the client gives up; the server's stop cancels it.
            while await reader.read(65536):
                pass
            return False
        headers = {"x-request-id": rid, **reply.headers}
        status, body, content_type = reply.status_code, reply.body, reply.content_type
        return await self._send(writer, status, body, content_type, headers, keep_alive)


def _loads_or_none(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except (UnicodeDecodeError, ValueError):
        return None
