"""Every row of the protocol's failure table, over a real socket against `sdclient.testing`."""

from __future__ import annotations

import dataclasses
import email.utils
import socket
import time

import pytest
from client_harness import FAST, FakeClock, MakeClient

import sdclient
from sdclient import GenerationEvent
from sdclient.testing import InferenceTestServer, Reply


def replies(server: InferenceTestServer) -> list[str]:
    return [r.reply for r in server.requests]


# -- 503 loading ---------------------------------------------------------------------------


async def test_loading_then_image_waits_about_the_estimate(
    server: InferenceTestServer, make_client: MakeClient
):
    server.enqueue(Reply.loading(0.3), Reply.image())
    client = make_client()

    image = await client.generate("a fox")

    assert replies(server) == ["loading", "image"]
    gap = server.requests[1].received_at - server.requests[0].received_at
    assert 0.28 <= gap < 0.8, "the probe should come about estimated_time later, not at once nor much later"
    assert image.attempts == 2
    assert image.timings.cold_start_wait_s == pytest.approx(gap, abs=0.1)
    assert client.usage.total.cold_start_waits == 1
    assert client.usage.total.retries == 0  # a cold start is not a retry


async def test_loading_past_max_wait_raises_model_loading_timeout_quickly(
    server: InferenceTestServer, make_client: MakeClient
):
    server.cold_start(30.0)
    client = make_client(max_wait_for_model=0.4)

    start = time.monotonic()
    with pytest.raises(sdclient.ModelLoadingTimeout) as info:
        await client.generate("a fox")
    elapsed = time.monotonic() - start

    assert 0.35 <= elapsed < 1.5
    exc = info.value
    assert isinstance(exc, TimeoutError)
    assert exc.status_code == 503
    assert 0.3 <= exc.waited_s <= 0.6
    assert exc.estimated_time is not None and 28 < exc.estimated_time < 30
    assert "currently loading" in exc.message
    assert "max_wait_for_model" in str(exc)
    assert len(server.requests) == 2  # the first answer and one last probe at the deadline
    assert client.status.state == "loading"
    assert client.usage.total.failures == {"ModelLoadingTimeout": 1}


async def test_loading_without_estimate_probes_at_the_interval(
    server: InferenceTestServer, make_client: MakeClient
):
    server.enqueue(Reply.status(503, {"error": "Model user/sd-model is currently loading"}), Reply.image())
    client = make_client()

    image = await client.generate("a fox")

    assert image.attempts == 2
    assert replies(server) == ["status", "image"]


# -- 503 that is not "loading" -------------------------------------------------------------


async def test_503_html_is_retried_with_backoff(server: InferenceTestServer, make_client: MakeClient):
    server.enqueue(Reply.html(503), Reply.html(503), Reply.image())
    client = make_client(max_retries=2)

    image = await client.generate("a fox")

    assert replies(server) == ["html", "html", "image"]
    assert image.attempts == 3
    assert client.usage.total.retries == 2


async def test_503_html_exhausted_is_a_server_error_with_a_short_message(
    server: InferenceTestServer, make_client: MakeClient
):
    server.default = Reply.html(503)
    client = make_client(max_retries=2)

    with pytest.raises(sdclient.ServerError) as info:
        await client.generate("a fox")

    assert len(server.requests) == 3
    assert info.value.status_code == 503
    assert info.value.message == "503 Service Unavailable"  # the page's title, not the HTML
    assert "<" not in str(info.value)
    assert info.value.request_id == server.requests[-1].request_id


# -- 429 -----------------------------------------------------------------------------------


async def test_429_retry_after_seconds_is_honoured(server: InferenceTestServer, make_client: MakeClient):
    server.enqueue(Reply.rate_limited(retry_after=0.3), Reply.image())
    events: list[GenerationEvent] = []
    client = make_client(on_event=events.append)

    await client.generate("a fox")

    gap = server.requests[1].received_at - server.requests[0].received_at
    assert gap >= 0.29
    retrying = [e for e in events if e.kind == "retrying"]
    assert len(retrying) == 1 and retrying[0].delay_s == pytest.approx(0.3)
    assert "Rate limit reached" in (retrying[0].message or "")


async def test_429_retry_after_http_date_is_honoured(server: InferenceTestServer, make_client: MakeClient):
    # An HTTP date has whole seconds: 1.5 s from now names a moment 0.5 to 1.5 s away.
    when = time.time() + 1.5
    server.enqueue(Reply.rate_limited(retry_after=email.utils.formatdate(when, usegmt=True)), Reply.image())
    events: list[tuple[float, GenerationEvent]] = []
    client = make_client(on_event=lambda event: events.append((time.time(), event)))

    await client.generate("a fox")

    (retrying,) = [e for _, e in events if e.kind == "retrying"]
    assert retrying.delay_s is not None and 0.0 < retrying.delay_s <= 1.5
    resent_at = [t for t, e in events if e.kind == "sending" and e.attempt == 2][0]
    assert resent_at >= int(when) - 0.02, "the retry came before the moment the server named"
    assert resent_at < int(when) + 0.5


async def test_429_retry_after_is_capped(server: InferenceTestServer, make_client: MakeClient):
    server.enqueue(Reply.rate_limited(retry_after=3600), Reply.image())
    events: list[GenerationEvent] = []
    client = make_client(on_event=events.append, retry=dataclasses.replace(FAST, max_retry_after=0.2))

    image = await client.generate("a fox")

    (retrying,) = [e for e in events if e.kind == "retrying"]
    assert retrying.delay_s == pytest.approx(0.2)
    assert image.attempts == 2


async def test_429_without_retry_after_backs_off(server: InferenceTestServer, make_client: MakeClient):
    server.enqueue(Reply.rate_limited(), Reply.image())
    events: list[GenerationEvent] = []
    client = make_client(on_event=events.append)

    image = await client.generate("a fox")

    (retrying,) = [e for e in events if e.kind == "retrying"]
    assert retrying.delay_s is not None and 0.0075 <= retrying.delay_s <= 0.01  # FAST: 10 ms, 25 % jitter
    assert image.attempts == 2


async def test_429_out_of_retries_is_rate_limited_with_retry_after(
    server: InferenceTestServer, make_client: MakeClient
):
    server.default = Reply.rate_limited(retry_after=0.05)
    client = make_client(max_retries=1)

    with pytest.raises(sdclient.RateLimited) as info:
        await client.generate("a fox")

    assert len(server.requests) == 2
    assert info.value.status_code == 429
    assert info.value.retry_after == pytest.approx(0.05)
    assert "Rate limit reached" in info.value.message


async def test_retry_after_beyond_the_deadline_gives_up_at_once(
    server: InferenceTestServer, make_client: MakeClient
):
    server.default = Reply.rate_limited(retry_after=1.5)
    client = make_client(max_wait_for_model=1.0)

    start = time.monotonic()
    with pytest.raises(sdclient.RateLimited) as info:
        await client.generate("a fox")

    assert time.monotonic() - start < 0.5  # never sleeps past the deadline
    assert len(server.requests) == 1
    assert info.value.retry_after == pytest.approx(1.5)


# -- 4xx: never retried --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "error", "message"),
    [
        (
            Reply.error(400, "Invalid `width`: must be a multiple of 8"),
            sdclient.InvalidRequest,
            "multiple of 8",
        ),
        (
            Reply.status(
                422, {"error": ["value is not a valid integer: `width` in `parameters`", "bad `height`"]}
            ),
            sdclient.InvalidRequest,
            "value is not a valid integer: `width` in `parameters`; bad `height`",
        ),
        (
            Reply.error(401, "Invalid credentials in Authorization header"),
            sdclient.AuthenticationError,
            "Invalid credentials",
        ),
        (
            Reply.error(403, "This token cannot call Inference Providers"),
            sdclient.PermissionDenied,
            "cannot call",
        ),
        (
            Reply.error(402, "You have exceeded your monthly included credits for Inference Providers."),
            sdclient.InsufficientCredits,
            "monthly included credits",
        ),
        (Reply.error(404, "Model user/sd-model does not exist"), sdclient.ModelNotFound, "does not exist"),
        (
            Reply.error(410, "The requested model is no longer supported by api-inference"),
            sdclient.EndpointGone,
            "no longer supported",
        ),
    ],
)
async def test_client_errors_are_not_retried(
    server: InferenceTestServer, make_client: MakeClient, reply: Reply, error: type, message: str
):
    server.default = reply
    client = make_client()

    with pytest.raises(error) as info:
        await client.generate("a fox")

    assert len(server.requests) == 1, "a 4xx must not be retried"
    exc = info.value
    assert exc.status_code == reply.status_code
    assert message in exc.message
    assert exc.request_id == server.requests[0].request_id
    assert exc.model == client.model
    assert client.usage.total.failures == {type(exc).__name__: 1}


@pytest.mark.parametrize(
    ("status", "hint"),
    [
        (401, "HF_TOKEN"),
        (401, "Make calls to Inference Providers"),
        (403, "Make calls to Inference Providers"),
        (402, "credits"),
        (404, "spelled right"),
        (404, "endpoint is running"),
        (410, "router"),
        (410, "Inference Endpoint"),
    ],
)
async def test_client_errors_say_how_to_fix(
    server: InferenceTestServer, make_client: MakeClient, status: int, hint: str
):
    server.default = Reply.error(status, "nope")
    client = make_client()

    with pytest.raises(sdclient.APIStatusError) as info:
        await client.generate("a fox")

    assert hint in str(info.value)


async def test_server_side_parameter_validation_is_reported(
    server: InferenceTestServer, make_client: MakeClient
):
    client = make_client()

    with pytest.raises(sdclient.InvalidRequest) as info:
        await client.generate("a fox", extra_parameters={"scheduler": 5})

    assert info.value.status_code == 422
    assert "`scheduler` in `parameters`" in info.value.message
    assert len(server.requests) == 1


async def test_403_is_also_an_authentication_error(server: InferenceTestServer, make_client: MakeClient):
    server.default = Reply.error(403, "forbidden")
    with pytest.raises(sdclient.AuthenticationError):
        await make_client().generate("a fox")


# -- 5xx -----------------------------------------------------------------------------------


async def test_500_is_retried_a_bounded_number_of_times(server: InferenceTestServer, make_client: MakeClient):
    server.default = Reply.error(500, "unknown error")
    client = make_client(max_retries=3)

    with pytest.raises(sdclient.ServerError) as info:
        await client.generate("a fox")

    assert len(server.requests) == 4  # 1 + max_retries
    assert info.value.status_code == 500
    assert info.value.message == "unknown error"
    assert client.usage.total.retries == 3
    assert client.usage.total.requests == 4
    assert client.status.state == "unavailable"


async def test_500_then_image_succeeds(server: InferenceTestServer, make_client: MakeClient):
    server.enqueue(Reply.error(500, "unknown error"), Reply.image())
    image = await make_client().generate("a fox")
    assert image.attempts == 2


@pytest.mark.parametrize("status", [502, 504])
async def test_gateway_html_is_retried(server: InferenceTestServer, make_client: MakeClient, status: int):
    server.enqueue(Reply.html(status), Reply.image())
    image = await make_client().generate("a fox")
    assert [r.reply for r in server.requests] == ["html", "image"]
    assert image.attempts == 2


@pytest.mark.parametrize(("status", "title"), [(502, "502 Bad Gateway"), (504, "504 Gateway Timeout")])
async def test_gateway_html_exhausted(
    server: InferenceTestServer, make_client: MakeClient, status: int, title: str
):
    server.default = Reply.html(status)
    client = make_client(max_retries=1)

    with pytest.raises(sdclient.ServerError) as info:
        await client.generate("a fox")

    assert len(server.requests) == 2
    assert info.value.status_code == status
    assert info.value.message == title


async def test_max_retries_zero_sends_once(server: InferenceTestServer, make_client: MakeClient):
    server.default = Reply.html(502)
    with pytest.raises(sdclient.ServerError):
        await make_client(max_retries=0).generate("a fox")
    assert len(server.requests) == 1


# -- transport failures --------------------------------------------------------------------


def _refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/models/{'user/sd-model'}"


async def test_connection_refused_is_retried_until_the_deadline_then_raised(make_client: MakeClient):
    clock = FakeClock()
    events: list[GenerationEvent] = []
    client = make_client(
        _refused_url(),
        max_retries=2,
        max_wait_for_model=5.0,
        clock=clock,
        sleep=clock.sleep,
        on_event=events.append,
    )

    with pytest.raises(sdclient.APIConnectionError) as info:
        await client.generate("a fox")

    assert not isinstance(info.value, sdclient.APITimeoutError)
    assert "ConnectError" in str(info.value)
    # A server that is still starting refuses connections: waited for until max_wait_for_model,
    # not just max_retries times.
    assert [e.kind for e in events].count("sending") > 3
    assert clock.now <= 5.0
    assert client.usage.total.failures == {"APIConnectionError": 1}


async def test_a_server_that_starts_late_is_waited_for(make_client: MakeClient):
    url = _refused_url()
    port = int(url.split(":")[2].split("/")[0])
    late = InferenceTestServer(port=port)

    def start_on_the_fifth_send(event: GenerationEvent) -> None:
        if event.kind == "sending" and event.attempt == 5:
            late.start()

    client = make_client(url, max_retries=1, on_event=start_on_the_fifth_send)
    try:
        image = await client.generate("a fox")
    finally:
        late.stop()
    assert image.attempts == 5
    assert len(late.requests) == 1


async def test_read_timeout_on_a_hanging_server(server: InferenceTestServer, make_client: MakeClient):
    server.default = Reply.hang()
    client = make_client(timeout=0.2, max_retries=1)

    start = time.monotonic()
    with pytest.raises(sdclient.APITimeoutError) as info:
        await client.generate("a fox")

    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, sdclient.APIConnectionError)
    assert len(server.requests) == 2
    assert time.monotonic() - start < 1.5


async def test_hang_then_image(server: InferenceTestServer, make_client: MakeClient):
    server.enqueue(Reply.hang(), Reply.image())
    image = await make_client(timeout=0.2).generate("a fox")
    assert image.attempts == 2


@pytest.mark.parametrize("failure", [Reply.reset(), Reply.truncated(), Reply.truncated(format="png")])
async def test_reset_and_truncated_are_retried(
    server: InferenceTestServer, make_client: MakeClient, failure: Reply
):
    server.enqueue(failure, Reply.image())
    image = await make_client().generate("a fox")
    assert [r.reply for r in server.requests] == [failure.kind, "image"]
    assert image.attempts == 2


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
async def test_an_image_cut_short_inside_a_complete_answer_is_retried(
    server: InferenceTestServer, make_client: MakeClient, fmt: str
):
    # The HTTP answer is whole (its Content-Length matches), the image in it is not.
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buffer, fmt)
    half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    server.enqueue(Reply.status(200, half, f"image/{fmt.lower()}"), Reply.image())
    image = await make_client().generate("a fox")
    assert image.attempts == 2


@pytest.mark.parametrize("failure", [Reply.reset(), Reply.truncated()])
async def test_reset_and_truncated_exhausted(
    server: InferenceTestServer, make_client: MakeClient, failure: Reply
):
    server.default = failure
    client = make_client(max_retries=1)

    with pytest.raises(sdclient.APIConnectionError):
        await client.generate("a fox")

    assert len(server.requests) == 2


# -- 200 that is not an image --------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "image/jpeg"])
async def test_200_that_is_not_an_image(
    server: InferenceTestServer, make_client: MakeClient, content_type: str
):
    server.default = Reply.not_image(content_type)
    client = make_client()

    with pytest.raises(sdclient.InvalidImage) as info:
        await client.generate("a fox")

    assert len(server.requests) == 1  # a server bug: not retried
    assert info.value.content_type == content_type
    assert info.value.request_id == server.requests[0].request_id
    assert "not a PNG, JPEG or WebP image" in str(info.value)


async def test_image_with_a_valid_header_but_garbage_inside(
    server: InferenceTestServer, make_client: MakeClient
):
    # A PNG signature followed by junk: the header cannot be parsed.
    server.default = Reply.status(200, b"\x89PNG\r\n\x1a\n" + b"junk" * 10 + b"IEND\xaeB`\x82", "image/png")
    with pytest.raises(sdclient.InvalidImage, match="cannot be decoded"):
        await make_client().generate("a fox")
