"""Pure pieces: Retry-After parsing, back-off, error mapping and messages, payloads, saved PNGs."""

from __future__ import annotations

import email.utils
import io
import json
from pathlib import Path

import httpx
import pytest
from client_harness import MakeClient
from PIL import Image

import sdclient
from sdclient import GeneratedImage, GenerateRequest, RetryPolicy
from sdclient._coldstart import loading_answer
from sdclient._exceptions import make_status_error
from sdclient._models import image_filename
from sdclient._retry import backoff_delay, is_retryable, parse_retry_after
from sdclient.protocol import error_message_from_body
from sdclient.testing import InferenceTestServer, Reply

NOW = 1_700_000_000.0

# -- retry policy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("soon", None),
        ("3", 3.0),
        ("0.5", 0.5),
        (" 20 ", 20.0),
        ("-4", 0.0),
        ("61", 60.0),  # capped
        ("3600", 60.0),
        (email.utils.formatdate(NOW + 12, usegmt=True), 12.0),
        (email.utils.formatdate(NOW - 30, usegmt=True), 0.0),  # in the past: at once
        (email.utils.formatdate(NOW + 7200, usegmt=True), 60.0),
        ("nan", None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None):
    assert parse_retry_after(header, cap=60.0, now=NOW) == expected


@pytest.mark.parametrize(("retry", "base"), [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (9, 8.0)])
def test_backoff_is_exponential_capped_and_jittered(retry: int, base: float):
    policy = RetryPolicy()
    delays = [backoff_delay(retry, policy) for _ in range(200)]
    assert all(0.75 * base <= d <= base for d in delays)
    assert len(set(delays)) > 100  # jittered, not a fixed sleep


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (make_status_error(429, "slow", model="m"), True),
        (make_status_error(500, "x", model="m"), True),
        (make_status_error(502, "x", model="m"), True),
        (make_status_error(503, "x", model="m"), True),
        (make_status_error(504, "x", model="m"), True),
        (make_status_error(599, "x", model="m"), True),
        (make_status_error(408, "x", model="m"), True),
        (make_status_error(400, "x", model="m"), False),
        (make_status_error(401, "x", model="m"), False),
        (make_status_error(402, "x", model="m"), False),
        (make_status_error(403, "x", model="m"), False),
        (make_status_error(404, "x", model="m"), False),
        (make_status_error(410, "x", model="m"), False),
        (make_status_error(422, "x", model="m"), False),
        (sdclient.APIConnectionError("reset", model="m"), True),
        (sdclient.APITimeoutError("slow", model="m"), True),
        (sdclient.ModelLoadingTimeout("loading", model="m", waited_s=1, estimated_time=2), False),
        (sdclient.InvalidImage("junk", model="m", content_type=None, request_id=None), False),
        (ValueError("bug"), False),
    ],
)
def test_is_retryable(error: BaseException, retry: bool):
    assert is_retryable(error) is retry


def test_a_timeout_after_sending_is_not_retried_when_the_policy_says_so():
    sent = sdclient.APITimeoutError("slow", model="m", sent=True)
    unsent = sdclient.APITimeoutError("no connection", model="m", sent=False)
    once = sdclient.RetryPolicy(retry_read_timeouts=False)
    assert is_retryable(sent) and is_retryable(sent, sdclient.RetryPolicy())
    assert not is_retryable(sent, once)
    assert is_retryable(unsent, once)


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, sdclient.InvalidRequest),
        (422, sdclient.InvalidRequest),
        (401, sdclient.AuthenticationError),
        (403, sdclient.PermissionDenied),
        (402, sdclient.InsufficientCredits),
        (404, sdclient.ModelNotFound),
        (410, sdclient.EndpointGone),
        (429, sdclient.RateLimited),
        (500, sdclient.ServerError),
        (503, sdclient.ServerError),
        (418, sdclient.APIStatusError),
    ],
)
def test_status_to_class(status: int, cls: type):
    error = make_status_error(status, "msg", model="user/m", request_id="rid-1", retry_after=2.0)
    assert type(error) is cls
    assert (error.status_code, error.message, error.model, error.request_id) == (
        status,
        "msg",
        "user/m",
        "rid-1",
    )
    assert error.retry_after == 2.0
    assert f"HTTP {status} from user/m: msg" in str(error)
    assert "rid-1" in str(error)
    assert isinstance(error, sdclient.SDClientError)


def test_error_tree():
    assert issubclass(sdclient.PermissionDenied, sdclient.AuthenticationError)
    assert issubclass(sdclient.APITimeoutError, sdclient.APIConnectionError)
    assert issubclass(sdclient.APITimeoutError, TimeoutError)
    assert issubclass(sdclient.ModelLoadingTimeout, sdclient.APIStatusError)
    assert issubclass(sdclient.ModelLoadingTimeout, TimeoutError)
    for name in ("UsageLimitExceeded", "InvalidImage", "APIConnectionError", "APIStatusError"):
        assert getattr(sdclient, name).__mro__[1] is sdclient.SDClientError


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b'{"error": "Model x does not exist"}', "application/json", "Model x does not exist"),
        (b'{"error": ["a: `width`", "b: `height`"]}', "application/json", "a: `width`; b: `height`"),
        (b'{"error": [{"msg": "too big", "loc": ["width"]}]}', "application/json", "too big"),
        (b'{"error": {"code": "busy", "message": "try later"}}', "application/json", "try later"),
        (b'{"detail": "Not Found"}', "application/json", "Not Found"),
        (b'{"error": "x", "estimated_time": 3}', None, "x"),
        (
            b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title><style>p{}</style></head>"
            b"<body><h1>502 Bad Gateway</h1><p>cloudflare</p></body></html>",
            "text/html",
            "502 Bad Gateway",
        ),
        (
            b"<html><body><h1>Scaling up</h1>\n\n<p>the endpoint &amp; its replica</p></body></html>",
            "text/html",
            "Scaling up the endpoint & its replica",
        ),
        (
            b"You have exceeded your monthly included credits",
            "text/plain",
            "You have exceeded your monthly included credits",
        ),
        (b"", "text/plain", "Service Unavailable"),
        (b"x" * 1000, "text/plain", "x" * 299 + "…"),
        (b"\xff\xfe bad utf8", None, "\ufffd\ufffd bad utf8"),
    ],
)
def test_error_message_from_body(body: bytes, content_type: str | None, expected: str):
    assert error_message_from_body(body, content_type, reason="Service Unavailable") == expected


def _response(status: int, body: object, content_type: str = "application/json") -> httpx.Response:
    content = json.dumps(body).encode() if not isinstance(body, bytes) else body
    return httpx.Response(status, content=content, headers={"content-type": content_type})


@pytest.mark.parametrize(
    ("response", "estimate"),
    [
        (_response(503, {"error": "Model x is currently loading", "estimated_time": 42.7}), 42.7),
        (_response(503, {"error": "Model x is currently loading"}), None),
        (_response(503, {"estimated_time": 5}), 5.0),
    ],
)
def test_loading_answer(response: httpx.Response, estimate: float | None):
    answer = loading_answer(response)
    assert answer is not None
    assert answer.estimated_time == estimate


@pytest.mark.parametrize(
    "response",
    [
        _response(503, {"error": "Service overloaded"}),
        _response(503, b"<html>Model loading</html>", "text/html"),
        _response(500, {"error": "Model x is currently loading", "estimated_time": 1}),
        _response(503, ["loading"]),
    ],
)
def test_not_a_loading_answer(response: httpx.Response):
    assert loading_answer(response) is None


# -- models --------------------------------------------------------------------------------


def test_payload_omits_unset_parameters():
    assert GenerateRequest(prompt="a").to_payload() == {"inputs": "a"}
    request = GenerateRequest(
        prompt="a", width=512, seed=0, guidance_scale=0.0, extra_parameters={"eta": 0.1}
    )
    assert request.to_payload() == {
        "inputs": "a",
        "parameters": {"eta": 0.1, "width": 512, "guidance_scale": 0.0, "seed": 0},
    }


def test_request_validation():
    with pytest.raises(ValueError, match="prompt"):
        GenerateRequest(prompt="")
    with pytest.raises(ValueError, match="num_inference_steps"):
        GenerateRequest(prompt="a", num_inference_steps=0)
    with pytest.raises(ValueError, match="Extra inputs"):
        GenerateRequest(prompt="a", sampler="x")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("prompt", "seed", "name"),
    [
        (
            "Portrait of Abraza man, as a Peaky Blinders character!",
            42,
            "portrait-of-abraza-man-as-a-peaky-blinders-character-42.png",
        ),
        ("***", 1, "image-1.png"),
        ("ünïcödé café", None, "unicode-cafe.png"),
        ("a" * 100, 7, "a" * 60 + "-7.png"),
    ],
)
def test_image_filename(prompt: str, seed: int | None, name: str):
    assert image_filename(prompt, seed) == name


@pytest.mark.parametrize("format", ["jpeg", "png", "webp"])
async def test_save_writes_png_with_metadata(
    server: InferenceTestServer, make_client: MakeClient, tmp_path: Path, format: str
):
    server.default = Reply.image(format=format)
    image = await make_client().generate(
        "a red fox", negative_prompt="blurry", seed=99, width=40, height=24, guidance_scale=6.5
    )

    path = image.save(tmp_path / "sub" / "fox.png")

    assert path == tmp_path / "sub" / "fox.png"
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert saved.size == (40, 24)
        text = saved.text  # type: ignore[attr-defined]
        assert text["prompt"] == "a red fox"
        assert text["negative_prompt"] == "blurry"
        assert text["seed"] == "99"
        assert json.loads(text["parameters"]) == {
            "negative_prompt": "blurry",
            "width": 40,
            "height": 24,
            "guidance_scale": 6.5,
            "seed": 99,
        }
        assert text["model"] == image.model
        # Same pixels as the decoded original (JPEG is converted losslessly after decoding).
        assert saved.convert("RGB").tobytes() == image.to_pil().convert("RGB").tobytes()


async def test_save_into_a_directory_names_the_file(
    server: InferenceTestServer, make_client: MakeClient, tmp_path: Path
):
    image = await make_client().generate("A fox; at night", seed=5)
    assert image.save(tmp_path) == tmp_path / "a-fox-at-night-5.png"


def test_generated_image_repr_has_no_bytes():
    data = io.BytesIO()
    Image.new("RGB", (4, 4)).save(data, "PNG")
    image = GeneratedImage(
        data=data.getvalue(),
        content_type="image/png",
        format="png",
        width=4,
        height=4,
        request=GenerateRequest(prompt="p", seed=1),
        model="m",
        timings=sdclient.Timings(total_s=0.1),
    )
    assert "data=" not in repr(image)
    assert image.seed == 1


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize(("mode", "size"), [("RGB", (1, 1)), ("L", (64, 48)), ("RGB", (1023, 77))])
def test_an_image_is_complete_up_to_its_end_marker(fmt: str, mode: str, size: tuple[int, int]):
    from sdclient._client import _is_complete

    buffer = io.BytesIO()
    options = {"progressive": True, "exif": Image.Exif()} if fmt == "JPEG" else {}
    Image.new(mode, size).save(buffer, fmt, **options)
    data = buffer.getvalue()
    assert _is_complete(fmt.lower(), data)  # type: ignore[arg-type]
    assert not _is_complete(fmt.lower(), data[: len(data) - 20])  # type: ignore[arg-type]
