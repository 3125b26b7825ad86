"""What the test server answers (`Reply`) and what it records (`ReceivedRequest`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal, TypeAlias

from ..protocol import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE

__all__ = ["ImageFormat", "ReceivedRequest", "Reply", "ReplyKind"]

ImageFormat: TypeAlias = Literal["jpeg", "png", "webp"]
"""Image formats the server can encode."""

ReplyKind: TypeAlias = Literal[
    "image",
    "loading",
    "html",
    "rate_limited",
    "error",
    "status",
    "not_image",
    "truncated",
    "reset",
    "hang",
]
"""The kinds of scripted reply; `ReceivedRequest.reply` holds one of these or a server-made kind."""

_IMAGE_FORMATS: tuple[str, ...] = ("jpeg", "png", "webp")

RATE_LIMIT_MESSAGE = (
    "Rate limit reached. You reached free usage limit (reset hourly). "
    "Please subscribe to a plan at https://huggingface.co/pricing to use the API at this rate"
)


def _check_status(status: int) -> int:
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError(f"status must be an HTTP status code between 100 and 599, got {status!r}")
    return status


def _check_seconds(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _check_size(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_IMAGE_SIDE <= value <= MAX_IMAGE_SIDE:
        raise ValueError(
            f"{name} must be an integer number of pixels between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE}, "
            f"got {value!r}"
        )
    return value


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer of `InferenceTestServer`.

    Build replies with the class methods (`Reply.image()`, `Reply.loading(3.0)`, ...), then hand
    them to `InferenceTestServer.enqueue` or set one as `InferenceTestServer.default`. A reply is
    immutable and can be reused for any number of requests.

    Attributes:
        kind: What the reply does on the wire (see `ReplyKind`).
        status_code: HTTP status sent (unused by `reset` and `hang`).
        body: Body bytes for `html`, `status`, `error`, `not_image` and `rate_limited`.
        content_type: `Content-Type` of `body`.
        headers: Extra response headers.
        format: Image format for `image` and `truncated`.
        width: Image width; `None` takes the request's `parameters.width`, else the server default.
        height: Image height; `None` takes the request's `parameters.height`, else the server default.
        delay: Seconds to wait before answering (`image` only).
        compute_time: Value of the `x-compute-time` header of an image (`None`: not sent).
        estimated_time: `estimated_time` of a `loading` reply.
    """

    kind: ReplyKind
    status_code: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)
    format: ImageFormat = "jpeg"
    width: int | None = None
    height: int | None = None
    delay: float = 0.0
    compute_time: float | None = 0.05
    estimated_time: float = 0.0

    def __hash__(self) -> int:
        headers = tuple(sorted(self.headers.items()))
        return hash((self.kind, self.status_code, self.body, self.content_type, headers, self.format))

    @classmethod
    def image(
        cls,
        format: ImageFormat = "jpeg",
        width: int | None = None,
        height: int | None = None,
        delay: float = 0.0,
        compute_time: float | None = 0.05,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """A 200 with a real, decodable image, like a successful generation.

        The colour of the image is derived from the request's prompt and seed, so different
        prompts or seeds give different images; encoded images are cached, so this is cheap.
        Response headers: `x-compute-time`, `x-compute-type: cpu`, `x-compute-images: 1`,
        `x-request-id` and `x-sha`.

        Args:
            format: `"jpeg"`, `"png"` or `"webp"`.
            width: Width in pixels; `None` uses the request's `parameters.width`, else the
                server's default size (64 unless configured).
            height: Height in pixels, like `width`.
            delay: Seconds to wait before answering (a slow generation).
            compute_time: Seconds reported in `x-compute-time`; `None` sends no such header (like
                the Inference Endpoints server).
            headers: Extra response headers (they override the default ones).

        Raises:
            ValueError: An unknown format, a size outside the protocol's bounds or a negative time.
        """
        if format not in _IMAGE_FORMATS:
            raise ValueError(f"format must be one of {', '.join(_IMAGE_FORMATS)}, got {format!r}")
        return cls(
            kind="image",
            format=format,
            width=_check_size("width", width),
            height=_check_size("height", height),
            delay=_check_seconds("delay", delay),
            compute_time=None if compute_time is None else _check_seconds("compute_time", compute_time),
            headers=dict(headers or {}),
            content_type=f"image/{format}",
        )

    @classmethod
    def loading(cls, estimated_time: float = 20.0) -> Reply:
        """A 503 `{"error": "Model <id> is currently loading", "estimated_time": <s>}`.

        This answers a single request; use `InferenceTestServer.cold_start` for a model that
        stays loading for a while.

        Args:
            estimated_time: The `estimated_time` sent, in seconds.

        Raises:
            ValueError: A negative time.
        """
        return cls(
            kind="loading",
            status_code=503,
            estimated_time=_check_seconds("estimated_time", estimated_time),
        )

    @classmethod
    def html(cls, status: int = 503) -> Reply:
        """An HTML error page from a gateway (what a scaling or overloaded endpoint sends).

        Args:
            status: The HTTP status (503, 502 and 504 are typical).

        Raises:
            ValueError: Not a valid HTTP status.
        """
        _check_status(status)
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Error"
        page = (
            f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
            f"<center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
            "</body>\r\n</html>\r\n"
        )
        return cls(kind="html", status_code=status, body=page.encode(), content_type="text/html")

    @classmethod
    def rate_limited(cls, retry_after: float | str | None = None) -> Reply:
        """A 429 `{"error": "Rate limit reached ..."}`, with `Retry-After` when given.

        Args:
            retry_after: Seconds (sent as a number, e.g. `1` or `0.5`) or an HTTP date string
                (sent as is); `None` sends no `Retry-After` header.

        Raises:
            ValueError: A negative number of seconds.
        """
        headers: dict[str, str] = {}
        if isinstance(retry_after, str):
            headers["retry-after"] = retry_after
        elif retry_after is not None:
            headers["retry-after"] = f"{_check_seconds('retry_after', retry_after):g}"
        body = json.dumps({"error": RATE_LIMIT_MESSAGE}).encode()
        return cls(kind="rate_limited", status_code=429, body=body, headers=headers)

    @classmethod
    def error(cls, status: int, message: str, headers: Mapping[str, str] | None = None) -> Reply:
        """A JSON error `{"error": message}` with the given status (400, 401, 402, 404, 500...).

        Args:
            status: The HTTP status.
            message: The error text, as the service would write it.
            headers: Extra response headers.

        Raises:
            ValueError: Not a valid HTTP status.
        """
        body = json.dumps({"error": message}).encode()
        return cls(kind="error", status_code=_check_status(status), body=body, headers=dict(headers or {}))

    @classmethod
    def status(
        cls,
        status: int,
        body: bytes | str | Mapping[str, Any] | list[Any] = b"",
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Any status with any body: the escape hatch for cases the other kinds do not cover.

        Args:
            status: The HTTP status.
            body: Bytes (sent as is), a string (UTF-8) or a dict/list (sent as JSON).
            content_type: Defaults to `application/json` for a dict/list, `text/plain;
                charset=utf-8` for a string and `application/octet-stream` for bytes.
            headers: Extra response headers.

        Raises:
            ValueError: Not a valid HTTP status.
        """
        if isinstance(body, bytes):
            data, default_type = body, "application/octet-stream"
        elif isinstance(body, str):
            data, default_type = body.encode(), "text/plain; charset=utf-8"
        else:
            data, default_type = json.dumps(body).encode(), "application/json"
        return cls(
            kind="status",
            status_code=_check_status(status),
            body=data,
            content_type=content_type or default_type,
            headers=dict(headers or {}),
        )

    @classmethod
    def not_image(cls, content_type: str = "application/json") -> Reply:
        """A 200 whose body is not an image.

        Args:
            content_type: `application/json` sends a JSON object, `text/...` sends text and any
                other type (e.g. `image/jpeg`, a lying header) sends bytes that no image decoder
                accepts.
        """
        if content_type.startswith("application/json"):
            body = json.dumps({"generated_text": "this is not an image"}).encode()
        elif content_type.startswith("text/"):
            body = b"this is not an image"
        else:
            body = b"\x00\x01not an image\x02\x03" * 8
        return cls(kind="not_image", status_code=200, body=body, content_type=content_type)

    @classmethod
    def truncated(cls, format: ImageFormat = "jpeg") -> Reply:
        """A 200 image whose `Content-Length` promises the whole image, but only half is sent
        before the connection is closed.

        Args:
            format: Format of the (partly sent) image.
        """
        if format not in _IMAGE_FORMATS:
            raise ValueError(f"format must be one of {', '.join(_IMAGE_FORMATS)}, got {format!r}")
        return cls(kind="truncated", format=format, content_type=f"image/{format}")

    @classmethod
    def reset(cls) -> Reply:
        """No response: the connection is reset (TCP RST, `SO_LINGER` 0) once the request is read."""
        return cls(kind="reset", status_code=0)

    @classmethod
    def hang(cls) -> Reply:
        """No response, ever: the connection stays open until the client gives up (a read
        timeout) or the server stops."""
        return cls(kind="hang", status_code=0)


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """A request as the test server received it.

    Attributes:
        method: HTTP method (`"POST"`, `"GET"`).
        path: Request path without the query string (`"/models/user/model"`).
        headers: Request headers, names lower-cased.
        json: The body parsed as JSON, or `None` when it is empty or not JSON.
        received_at: `time.monotonic()` when the request was fully read.
        reply: What answered it: a `ReplyKind`, or one of the server's own answers: `"health"`,
            `"invalid_request"` (400/422), `"model_not_found"` (404 for a model outside
            `InferenceTestServer.models`), `"not_found"`, `"method_not_allowed"`,
            `"payload_too_large"`, `"not_implemented"`.
        body: The raw request body.
        request_id: The `x-request-id` sent back, when the reply had one.
    """

    method: str
    path: str
    headers: dict[str, str]
    json: Any
    received_at: float
    reply: str
    body: bytes = b""
    request_id: str | None = None

    @property
    def prompt(self) -> str | None:
        """The `inputs` of a JSON body, when it is a string."""
        if isinstance(self.json, dict):
            inputs = self.json.get("inputs")
            if isinstance(inputs, str):
                return inputs
        return None

    @property
    def parameters(self) -> dict[str, Any]:
        """The `parameters` object of a JSON body (`{}` when absent)."""
        if isinstance(self.json, dict):
            parameters = self.json.get("parameters")
            if isinstance(parameters, dict):
                return parameters
        return {}
