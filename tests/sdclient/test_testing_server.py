"""`sdclient.testing`: every reply kind does what it says, on real sockets, with plain httpx."""

from __future__ import annotations

import asyncio
import io
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import format_datetime

import httpx
import pytest
from PIL import Image

from sdclient.testing import InferenceTestServer, Reply, spawn_server

pytestmark = pytest.mark.timeout(30)

PROMPT = {"inputs": "a photo of a cat"}


@pytest.fixture
def server() -> Iterator[InferenceTestServer]:
    with InferenceTestServer() as s:
        yield s


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as c:
        yield c


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# -- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_image_is_decodable_and_sized_from_the_request(
    server: InferenceTestServer, client: httpx.Client, fmt: str, pil_format: str
) -> None:
    server.default = Reply.image(format=fmt)  # type: ignore[arg-type]
    body = {"inputs": "a cat", "parameters": {"width": 96, "height": 48, "seed": 7}}
    response = client.post(server.model_url("user/model"), json=body)

    assert response.status_code == 200
    assert response.headers["content-type"] == f"image/{fmt}"
    image = _decode(response.content)
    assert (image.format, image.size) == (pil_format, (96, 48))
    assert float(response.headers["x-compute-time"]) == pytest.approx(0.05)
    assert response.headers["x-compute-type"] == "cpu"
    assert len(response.headers["x-sha"]) == 40
    assert response.headers["x-request-id"] == server.requests[-1].request_id


def test_image_defaults_to_64_pixels_and_explicit_size_wins(
    server: InferenceTestServer, client: httpx.Client
) -> None:
    server.enqueue(Reply.image(width=32, height=16, headers={"x-compute-type": "1-t4"}))
    explicit = client.post(server.url, json={"inputs": "x", "parameters": {"width": 512}})
    default = client.post(server.url, json=PROMPT)

    assert _decode(explicit.content).size == (32, 16)
    assert explicit.headers["x-compute-type"] == "1-t4"
    assert _decode(default.content).size == (64, 64)


def test_image_varies_with_seed_and_prompt(server: InferenceTestServer, client: httpx.Client) -> None:
    bodies = [
        client.post(server.url, json={"inputs": "a cat", "parameters": {"seed": seed}}).content
        for seed in range(8)
    ]
    other_prompt = client.post(server.url, json={"inputs": "a dog", "parameters": {"seed": 0}}).content
    same_again = client.post(server.url, json={"inputs": "a cat", "parameters": {"seed": 0}}).content

    assert len(set(bodies)) == 8
    assert other_prompt != bodies[0]
    assert same_again == bodies[0]
    colours = {_decode(body).resize((1, 1)).getpixel((0, 0)) for body in bodies}
    assert len(colours) > 1


def test_512_jpeg_weighs_about_as_much_as_a_real_one(
    server: InferenceTestServer, client: httpx.Client
) -> None:
    response = client.post(server.url, json={"inputs": "x", "parameters": {"width": 512, "height": 512}})
    assert 30_000 < len(response.content) < 90_000


def test_image_delay(server: InferenceTestServer, client: httpx.Client) -> None:
    server.enqueue(Reply.image(delay=0.3))
    started = time.monotonic()
    assert client.post(server.url, json=PROMPT).status_code == 200
    assert time.monotonic() - started >= 0.3


# -- error replies --------------------------------------------------------------------------


def test_loading_reply(server: InferenceTestServer, client: httpx.Client) -> None:
    server.enqueue(Reply.loading(12.5))
    response = client.post(server.model_url("user/sd-raza"), json=PROMPT)
    assert response.status_code == 503
    assert response.json() == {"error": "Model user/sd-raza is currently loading", "estimated_time": 12.5}


def test_html_reply(server: InferenceTestServer, client: httpx.Client) -> None:
    server.enqueue(Reply.html(502))
    response = client.post(server.url, json=PROMPT)
    assert response.status_code == 502
    assert response.headers["content-type"] == "text/html"
    assert "<h1>502 Bad Gateway</h1>" in response.text


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [
        (1, "1"),
        (0.5, "0.5"),
        (format_datetime(datetime(2030, 1, 1, tzinfo=UTC), usegmt=True), "Tue, 01 Jan 2030 00:00:00 GMT"),
        (None, None),
    ],
)
def test_rate_limited_reply(
    server: InferenceTestServer, client: httpx.Client, retry_after: float | str | None, header: str | None
) -> None:
    server.enqueue(Reply.rate_limited(retry_after=retry_after))
    response = client.post(server.url, json=PROMPT)
    assert response.status_code == 429
    assert response.json()["error"].startswith("Rate limit reached")
    assert response.headers.get("retry-after") == header


def test_error_and_status_replies(server: InferenceTestServer, client: httpx.Client) -> None:
    server.enqueue(
        Reply.error(402, "You have exceeded your monthly included credits"),
        Reply.status(410, {"error": "gone"}),
        Reply.status(500, "oops"),
        Reply.status(504, b"\x00", content_type="application/x-thing", headers={"x-extra": "1"}),
    )
    credits, gone, oops, raw = (client.post(server.url, json=PROMPT) for _ in range(4))

    assert (credits.status_code, credits.json()) == (
        402,
        {"error": "You have exceeded your monthly included credits"},
    )
    assert (gone.status_code, gone.json()) == (410, {"error": "gone"})
    assert (oops.status_code, oops.text, oops.headers["content-type"]) == (
        500,
        "oops",
        "text/plain; charset=utf-8",
    )
    assert (raw.status_code, raw.content, raw.headers["content-type"]) == (
        504,
        b"\x00",
        "application/x-thing",
    )
    assert raw.headers["x-extra"] == "1"


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "image/jpeg"])
def test_not_image_reply(server: InferenceTestServer, client: httpx.Client, content_type: str) -> None:
    server.enqueue(Reply.not_image(content_type))
    response = client.post(server.url, json=PROMPT)
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    with pytest.raises(OSError):
        _decode(response.content)


def test_truncated_reply(server: InferenceTestServer, client: httpx.Client) -> None:
    server.enqueue(Reply.truncated())
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.post(server.url, json=PROMPT)
    # The server goes on serving new connections.
    assert client.post(server.url, json=PROMPT).status_code == 200


def test_reset_reply(server: InferenceTestServer, client: httpx.Client) -> None:
    server.enqueue(Reply.reset())
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        client.post(server.url, json=PROMPT)
    assert client.post(server.url, json=PROMPT).status_code == 200


def test_hang_reply_times_out(server: InferenceTestServer, client: httpx.Client) -> None:
    server.enqueue(Reply.hang())
    with pytest.raises(httpx.ReadTimeout):
        client.post(server.url, json=PROMPT, timeout=0.3)
    assert [r.reply for r in server.requests] == ["hang"]
    assert client.post(server.url, json=PROMPT).status_code == 200


def test_hang_ends_when_the_server_stops() -> None:
    server = InferenceTestServer().start()
    server.default = Reply.hang()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            httpx.post(server.url, json=PROMPT, timeout=10.0)
        except BaseException as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    server.wait_for_requests(1)
    started = time.monotonic()
    server.stop()
    caller.join(5.0)
    assert time.monotonic() - started < 3.0
    assert not caller.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], httpx.RemoteProtocolError | httpx.ReadError)


# -- script ---------------------------------------------------------------------------------


def test_queue_is_fifo_then_default(server: InferenceTestServer, client: httpx.Client) -> None:
    server.enqueue(Reply.error(500, "first"), Reply.error(400, "second"))
    server.default = Reply.error(418, "default")
    assert server.pending == 2
    statuses = [client.post(server.url, json=PROMPT).status_code for _ in range(4)]
    assert statuses == [500, 400, 418, 418]
    assert server.pending == 0


def test_cold_start_counts_down_then_serves(server: InferenceTestServer, client: httpx.Client) -> None:
    server.enqueue(Reply.error(500, "after loading"))
    server.cold_start(1.0)
    assert server.loading
    time.sleep(0.2)  # the clock starts at the first request, not at the call

    first = client.post(server.model_url("user/model"), json=PROMPT)
    time.sleep(0.2)
    second = client.post(server.model_url("user/model"), json=PROMPT)
    assert (first.status_code, second.status_code) == (503, 503)
    assert first.json()["error"] == "Model user/model is currently loading"
    first_eta, second_eta = first.json()["estimated_time"], second.json()["estimated_time"]
    assert 0.8 < first_eta <= 1.0
    assert 0 < second_eta < first_eta - 0.15

    time.sleep(second_eta + 0.05)
    assert not server.loading
    after = client.post(server.model_url("user/model"), json=PROMPT)
    assert after.json() == {"error": "after loading"}  # the queue waited for the model
    assert client.post(server.model_url("user/model"), json=PROMPT).status_code == 200
    assert server.requests_while_loading == 2
    assert [r.reply for r in server.requests] == ["loading", "loading", "error", "image"]


def test_cold_start_from_now(server: InferenceTestServer, client: httpx.Client) -> None:
    server.cold_start(1.0, from_now=True)
    time.sleep(0.3)
    response = client.post(server.url, json=PROMPT)
    assert response.status_code == 503
    assert response.json()["estimated_time"] <= 0.7


def test_wait_for_model_header_holds_the_request(server: InferenceTestServer, client: httpx.Client) -> None:
    server.cold_start(0.4)
    started = time.monotonic()
    response = client.post(server.url, json=PROMPT, headers={"x-wait-for-model": "true"})
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.35
    held_short = client.post(server.url, json=PROMPT, headers={"x-scale-up-timeout": "0.1"})
    assert held_short.status_code == 200  # the model is ready by now
    assert server.requests_while_loading == 1


def test_reset_forgets_script_records_and_cold_start(
    server: InferenceTestServer, client: httpx.Client
) -> None:
    initial_default = server.default
    server.enqueue(Reply.error(500, "x"))
    server.default = Reply.hang()
    server.cold_start(10)
    client.get(f"{server.url}/health")
    server.reset()
    assert (server.requests, server.pending, server.loading) == ([], 0, False)
    assert server.default == initial_default
    assert client.post(server.url, json=PROMPT).status_code == 200


def test_concurrent_requests_consume_each_reply_once(server: InferenceTestServer) -> None:
    server.enqueue(*(Reply.error(400 + i, f"reply {i}") for i in range(40)))

    async def main() -> list[int]:
        async with httpx.AsyncClient(timeout=5.0) as client:
            responses = await asyncio.gather(*(client.post(server.url, json=PROMPT) for _ in range(50)))
        return [r.status_code for r in responses]

    statuses = asyncio.run(main())
    assert sorted(s for s in statuses if s != 200) == list(range(400, 440))
    assert statuses.count(200) == 10


# -- routes and validation ------------------------------------------------------------------


def test_routes(server: InferenceTestServer, client: httpx.Client) -> None:
    assert client.get(f"{server.url}/health").json() == {"ok": True}
    assert client.post(server.model_url("user/model"), json=PROMPT).status_code == 200
    assert client.post(server.model_url("model"), json=PROMPT).status_code == 200
    assert client.post(f"{server.url}/", json=PROMPT).status_code == 200
    assert client.post(f"{server.url}/models/a/b/c", json=PROMPT).status_code == 404
    assert client.post(f"{server.url}/other", json=PROMPT).status_code == 404
    wrong_method = client.get(server.model_url("user/model"))
    assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "POST")


def test_unknown_models_get_404(client: httpx.Client) -> None:
    with InferenceTestServer(models={"user/known"}) as server:
        assert client.post(server.model_url("user/known"), json=PROMPT).status_code == 200
        unknown = client.post(server.model_url("user/unknown"), json=PROMPT)
        assert unknown.status_code == 404
        assert unknown.json() == {"error": "Model user/unknown does not exist"}
        server.models = None
        assert client.post(server.model_url("user/unknown"), json=PROMPT).status_code == 200


@pytest.mark.parametrize(
    ("content", "status", "needle"),
    [
        (b"", 400, "empty"),
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"prompt": "x"}', 400, "Missing `inputs`"),
        (b'{"inputs": 3}', 400, "`inputs` must be a string"),
        (b'{"inputs": "x", "parameters": 3}', 422, "`parameters`"),
        (b'{"inputs": "x", "parameters": {"width": "big"}}', 422, "`width` in `parameters`"),
        (b'{"inputs": "x", "parameters": {"guidance_scale": "7"}}', 422, "`guidance_scale` in `parameters`"),
    ],
)
def test_invalid_bodies_are_rejected_without_consuming_the_script(
    server: InferenceTestServer, client: httpx.Client, content: bytes, status: int, needle: str
) -> None:
    server.enqueue(Reply.error(500, "scripted"))
    response = client.post(server.url, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in (error if isinstance(error, str) else " ".join(error))
    assert server.pending == 1
    assert server.requests[-1].reply == "invalid_request"


def test_requests_are_recorded(server: InferenceTestServer, client: httpx.Client) -> None:
    server.enqueue(Reply.rate_limited())
    before = time.monotonic()
    body = {"inputs": "a cat", "parameters": {"seed": 3, "width": 64}}
    client.post(server.model_url("user/model"), json=body, headers={"Authorization": "Bearer hf_x"})
    client.post(server.model_url("user/model"), json=body)
    client.get(f"{server.url}/health")

    first, second, health = server.requests
    assert (first.method, first.path, first.json, first.reply) == (
        "POST",
        "/models/user/model",
        body,
        "rate_limited",
    )
    assert first.headers["authorization"] == "Bearer hf_x"
    assert first.headers["content-type"] == "application/json"
    assert (first.prompt, first.parameters) == ("a cat", {"seed": 3, "width": 64})
    assert second.reply == "image"
    assert (health.method, health.reply, health.json) == ("GET", "health", None)
    assert before <= first.received_at <= second.received_at <= health.received_at <= time.monotonic()


def test_stats_count_replies_without_records(client: httpx.Client) -> None:
    with InferenceTestServer(keep_records=False) as server:
        server.enqueue(Reply.rate_limited(), Reply.hang())
        server.cold_start(0.5)
        for _ in range(3):
            client.post(server.url, json=PROMPT)
        time.sleep(0.55)
        client.post(server.url, json=PROMPT)
        with pytest.raises(httpx.ReadTimeout):
            client.post(server.url, json=PROMPT, timeout=0.2)
        client.post(server.url, json=PROMPT)
        client.get(f"{server.url}/health")
        stats = client.get(f"{server.url}/stats").json()
        assert stats == server.stats()
    assert server.requests == []
    assert stats == {
        "requests": 7,
        "replies": {"loading": 3, "rate_limited": 1, "hang": 1, "image": 1, "health": 1},
        "requests_while_loading": 3,
        "loading": False,
        "pending": 0,
        "connections_opened": 2,
    }


def test_wait_for_requests_times_out(server: InferenceTestServer) -> None:
    with pytest.raises(TimeoutError, match="expected 1 requests"):
        server.wait_for_requests(1, timeout=0.05)


def test_replies_compare_and_hash_by_value() -> None:
    assert Reply.rate_limited(2) == Reply.rate_limited(2) != Reply.rate_limited(3)
    assert len({Reply.image(headers={"a": "1"}), Reply.image(headers={"a": "1"}), Reply.hang()}) == 2


def test_bad_replies_are_refused_early() -> None:
    with pytest.raises(ValueError, match="format"):
        Reply.image(format="gif")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status"):
        Reply.error(99, "x")
    with pytest.raises(ValueError, match="retry_after"):
        Reply.rate_limited(retry_after=-1)
    with pytest.raises(ValueError, match="width"):
        Reply.image(width=0)
    with pytest.raises(TypeError, match="Reply"):
        InferenceTestServer().enqueue("image")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="not running"):
        InferenceTestServer().url  # noqa: B018


# -- connections ----------------------------------------------------------------------------


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[bytes, dict[str, str], bytes]:
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response"
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    buffer[:] = rest[length:]
    return status_line.encode(), headers, rest[:length]


def test_keep_alive_serves_several_requests_on_one_connection(server: InferenceTestServer) -> None:
    server.enqueue(Reply.error(500, "x"), Reply.rate_limited(1))
    request = (
        b"POST /models/user/model HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 17\r\n\r\n{"inputs": "cat"}'
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        buffer = bytearray()
        statuses = []
        for _ in range(3):
            sock.sendall(request)
            status_line, headers, body = _read_response(sock, buffer)
            statuses.append(status_line.split(b" ")[1])
            assert headers["connection"] == "keep-alive"
        # Pipelined: two requests in one write, two answers in order.
        sock.sendall(request + request.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n"))
        for _ in range(2):
            status_line, headers, body = _read_response(sock, buffer)
            statuses.append(status_line.split(b" ")[1])
        assert headers["connection"] == "close"
        assert sock.recv(1) == b""  # closed after "Connection: close"
    assert statuses == [b"500", b"429", b"200", b"200", b"200"]
    assert server.connections_opened == 1


def test_httpx_reuses_the_connection(server: InferenceTestServer, client: httpx.Client) -> None:
    for _ in range(5):
        assert client.post(server.url, json=PROMPT).status_code == 200
    server.enqueue(Reply.truncated())
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(server.url, json=PROMPT)
    assert client.post(server.url, json=PROMPT).status_code == 200
    assert server.connections_opened == 2


def test_expect_100_continue(server: InferenceTestServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b'{"inputs": "cat"}')
        status_line, headers, body = _read_response(sock, bytearray())
    assert status_line.startswith(b"HTTP/1.1 200")
    assert _decode(body).size == (64, 64)


def test_malformed_request_gets_400(server: InferenceTestServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        status_line, headers, _ = _read_response(sock, bytearray())
    assert status_line.startswith(b"HTTP/1.1 400")
    assert headers["connection"] == "close"


# -- async and subprocess -------------------------------------------------------------------


async def test_async_context_manager_does_not_block_the_loop() -> None:
    async with InferenceTestServer() as server:
        server.default = Reply.image(delay=0.3)
        async with httpx.AsyncClient(timeout=5.0) as client:
            started = time.monotonic()
            responses = await asyncio.gather(*(client.post(server.url, json=PROMPT) for _ in range(10)))
            elapsed = time.monotonic() - started
    assert [r.status_code for r in responses] == [200] * 10
    assert elapsed < 1.5  # served concurrently, not one after the other


def test_spawn_server_serves_with_a_cold_start() -> None:
    assert InferenceTestServer.spawn is spawn_server
    with spawn_server(cold_start=0.3, size=128, format="png") as url:
        assert url.startswith("http://127.0.0.1:")
        first = httpx.post(f"{url}/models/user/model", json=PROMPT, timeout=5.0)
        assert first.status_code == 503
        time.sleep(first.json()["estimated_time"] + 0.05)
        response = httpx.post(f"{url}/models/user/model", json=PROMPT, timeout=5.0)
        assert response.status_code == 200
        assert _decode(response.content).size == (128, 128)
        assert response.headers["content-type"] == "image/png"
        stats = httpx.get(f"{url}/stats", timeout=5.0).json()
        assert stats["replies"] == {"loading": 1, "image": 1}
        assert (stats["requests"], stats["requests_while_loading"], stats["loading"]) == (2, 1, False)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2.0)


def test_command_line_prints_its_url_and_stops_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "sdclient.testing", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.split()[-1]
        assert httpx.get(f"{url}/health", timeout=5.0).json() == {"ok": True}
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        process.kill()
        process.wait()


def test_command_line_rejects_bad_arguments() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sdclient.testing", "--delay", "soon"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "expected a number of seconds" in result.stderr
