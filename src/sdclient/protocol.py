"""The text-to-image wire protocol, in one place.

Everything that speaks or serves the protocol imports it from here: :class:`sdclient.SDClient` and
its provider adapters, the proxy (which narrows the bounds by subclassing), ``sdtrain serve`` and
the test servers of :mod:`sdclient.testing`. ``docs/protocol.md`` is the prose version.

* where requests go: :data:`ROUTER_URL`, :data:`ROUTER_TEMPLATE`, :data:`HUB_ENDPOINT`;
* what is sent: :class:`GenerationOptions`, :class:`GenerateRequest` (the client's view) and
  :class:`TextToImageInputs` / :class:`TextToImageParameters` (the JSON body, as a server reads it),
  with their bounds; the header names in :class:`Header`;
* what comes back: :func:`loading_body` / :func:`parse_loading` (the cold-start 503),
  :func:`error_body` / :func:`error_message_from_body`; the PNG metadata keys;
* host and token rules: :func:`is_hf_host`, :func:`is_loopback`, :func:`resolve_token`,
  :data:`HUB_ID`.
"""

from __future__ import annotations

import html
import ipaddress
import json
import math
import os
import re
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "DEFAULT_BASE_URL",
    "HF_HOST_SUFFIXES",
    "HUB_ENDPOINT",
    "HUB_ID",
    "INVALID_BODY_STATUS",
    "INVALID_PARAMETERS_STATUS",
    "MAX_GUIDANCE_SCALE",
    "MAX_IMAGE_SIDE",
    "MAX_STEPS",
    "MIN_IMAGE_SIDE",
    "ROUTER_TEMPLATE",
    "ROUTER_URL",
    "SEED_LIMIT",
    "GenerateRequest",
    "GenerationOptions",
    "Guidance",
    "Header",
    "ImageSide",
    "InvalidBody",
    "LoadingInfo",
    "PngText",
    "Prompt",
    "Seed",
    "Steps",
    "TextToImageInputs",
    "TextToImageParameters",
    "error_body",
    "error_message_from_body",
    "header_is_true",
    "is_hf_host",
    "is_loopback",
    "loading_body",
    "parse_loading",
    "parse_text_to_image",
    "resolve_token",
    "validation_messages",
]

# -- where requests go --------------------------------------------------------------------------

HUB_ENDPOINT = "https://huggingface.co"
"""The Hub: model info (``/api/models/{id}``) and LoRA weights (``/{id}/resolve/main/{file}``)."""

ROUTER_URL = "https://router.huggingface.co"
"""Hugging Face's inference router."""

ROUTER_TEMPLATE = ROUTER_URL + "/{provider}"
"""Where the router forwards to one Inference Provider (like huggingface_hub's
``constants.INFERENCE_PROXY_TEMPLATE``)."""

DEFAULT_BASE_URL = ROUTER_TEMPLATE.format(provider="hf-inference")
"""Where a Hub model id on the ``hf-inference`` route is sent: ``{DEFAULT_BASE_URL}/models/{id}``."""

HF_HOST_SUFFIXES = ("huggingface.co", "huggingface.cloud")
"""Hugging Face hosts: a discovered token is only sent to these and their subdomains."""

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
"""A Hub model id: ``name`` or ``owner/name``."""


class Header:
    """Header names of the protocol (compare case-insensitively)."""

    WAIT_FOR_MODEL = "x-wait-for-model"
    """Request (legacy): hold the request while the model loads instead of answering 503."""
    USE_CACHE = "x-use-cache"
    """Request: ``false`` asks for a fresh image instead of a cached one."""
    SCALE_UP_TIMEOUT = "X-Scale-Up-Timeout"
    """Request (dedicated Endpoints): seconds to hold the request while a replica scales up from zero."""
    BILL_TO = "X-HF-Bill-To"
    """Request: bill an organization instead of the token's user."""
    COMPUTE_TIME = "x-compute-time"
    """Response: seconds of compute, as a decimal string."""
    COMPUTE_TYPE = "x-compute-type"
    """Response: ``cpu``, ``gpu``, a hardware name, or ``cache``."""
    COMPUTE_IMAGES = "x-compute-images"
    """Response: images billed."""
    REQUEST_ID = "x-request-id"
    """Response (and request): the request's id."""
    SHA = "x-sha"
    """Response: the model revision served."""
    SEED = "x-seed"
    """Response: the seed that was used."""
    RETRY_AFTER = "retry-after"
    """Response: seconds (or an HTTP date) to wait before trying again."""


def header_is_true(value: str | None) -> bool:
    """Whether a boolean header (``x-wait-for-model``, ``x-use-cache``) says yes: ``1``, ``true``, ``yes``."""
    return value is not None and value.strip().lower() in ("1", "true", "yes")


# -- what is sent -------------------------------------------------------------------------------

MIN_IMAGE_SIDE = 1
MAX_IMAGE_SIDE = 4096
"""Width and height the protocol accepts, in pixels (servers and the proxy may narrow them)."""
MAX_STEPS = 1000
"""Most denoising steps accepted."""
MAX_GUIDANCE_SCALE = 100.0
"""Largest guidance scale accepted."""
SEED_LIMIT = 2**64
"""Seeds are unsigned 64-bit integers: ``0 <= seed < SEED_LIMIT``."""

Prompt = Annotated[str, Field(min_length=1)]
"""A prompt: any non-empty text."""
# Numbers must be numbers (strict): "512" or true are refused rather than converted.
ImageSide = Annotated[int, Field(ge=MIN_IMAGE_SIDE, le=MAX_IMAGE_SIDE, strict=True)]
"""Width or height in pixels."""
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS, strict=True)]
"""Denoising steps."""
Guidance = Annotated[float, Field(ge=0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False, strict=True)]
"""Classifier-free guidance scale."""
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT, strict=True)]
"""Random seed."""

_OPTION_NAMES = ("negative_prompt", "width", "height", "num_inference_steps", "guidance_scale", "seed")


class GenerationOptions(BaseModel):
    """The prompt and the generation parameters every route understands.

    Fields left ``None`` are not sent, so the server's defaults apply. Narrow the bounds by
    subclassing with a narrower annotation (``width: Annotated[ImageSide | None, Field(le=1024)]``).
    """

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    """What to draw."""
    negative_prompt: str | None = None
    """What to steer away from."""
    width: ImageSide | None = None
    """Image width in pixels (Stable Diffusion wants a multiple of 8)."""
    height: ImageSide | None = None
    """Image height in pixels (Stable Diffusion wants a multiple of 8)."""
    num_inference_steps: Steps | None = None
    """Denoising steps: more is slower and usually finer."""
    guidance_scale: Guidance | None = None
    """How strongly the image follows the prompt (classifier-free guidance)."""
    seed: Seed | None = None
    """Random seed; the same seed and parameters give the same image."""


class GenerateRequest(GenerationOptions):
    """One text-to-image request as the client sends it: :class:`GenerationOptions` plus a scheduler
    and free-form extra parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheduler: str | None = None
    """A diffusers scheduler class name, e.g. ``"EulerDiscreteScheduler"`` (hf-inference only)."""
    extra_parameters: dict[str, Any] | None = None
    """Further entries for the request's parameters, sent as given."""

    def parameters(self) -> dict[str, Any]:
        """The ``parameters`` object of the request body, unset fields omitted."""
        params: dict[str, Any] = dict(self.extra_parameters or {})
        for name in _OPTION_NAMES:
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        if self.scheduler is not None:
            params["scheduler"] = self.scheduler
        return params

    def to_payload(self) -> dict[str, Any]:
        """The JSON body of the protocol: ``{"inputs": prompt, "parameters": {...}}``.

        Returns:
            A dict ready for ``json.dumps``; ``parameters`` is left out when empty.
        """
        payload: dict[str, Any] = {"inputs": self.prompt}
        params = self.parameters()
        if params:
            payload["parameters"] = params
        return payload


class TextToImageParameters(BaseModel):
    """The ``parameters`` object of a request body, as a server validates it (unknown keys kept)."""

    model_config = ConfigDict(extra="allow")

    negative_prompt: str | None = None
    width: ImageSide | None = None
    height: ImageSide | None = None
    num_inference_steps: Steps | None = None
    guidance_scale: Guidance | None = None
    seed: Seed | None = None
    scheduler: str | None = Field(default=None, min_length=1)


class TextToImageInputs(BaseModel):
    """The JSON body of a request: ``inputs`` (the prompt), ``parameters`` and the legacy ``options``."""

    model_config = ConfigDict(extra="forbid")

    inputs: Prompt
    parameters: TextToImageParameters = Field(default_factory=TextToImageParameters)
    options: dict[str, Any] | None = None


INVALID_BODY_STATUS = 400
"""Status for a body that is not a JSON object with a string ``inputs``."""
INVALID_PARAMETERS_STATUS = 422
"""Status for parameters out of bounds or of the wrong type."""

_EXAMPLE = 'like {"inputs": "a photo of a cat", "parameters": {"width": 512}}'


class InvalidBody(ValueError):
    """A request body the protocol refuses: :attr:`status` and :attr:`error` are the answer to send."""

    def __init__(self, status: int, error: str | list[str]) -> None:
        super().__init__(error if isinstance(error, str) else "; ".join(error))
        self.status = status
        self.error = error


def validation_messages(exc: ValidationError) -> list[str]:
    """pydantic errors in the serving container's form: ``"<msg>: `field` in `parameters`"``."""
    messages = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        if loc[:1] == ["parameters"] and len(loc) > 1:
            messages.append(f"{error['msg']}: `{'.'.join(loc[1:])}` in `parameters`")
        else:
            messages.append(f"{error['msg']}: `{'.'.join(loc) or 'body'}`")
    return messages


_Body = TypeVar("_Body", bound="TextToImageInputs")


def parse_text_to_image(body: bytes, model: type[_Body]) -> _Body:
    """Read a request body like the real service: 400 for the body, 422 for the parameters.

    Args:
        body: The raw request body.
        model: :class:`TextToImageInputs` or a subclass that narrows it.

    Returns:
        The validated body.

    Raises:
        InvalidBody: With the status and ``error`` to answer.
    """
    if not body.strip():
        raise InvalidBody(INVALID_BODY_STATUS, f"Request body is empty: send a JSON object {_EXAMPLE}")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        message = f"Request body is not valid JSON ({exc}): send a JSON object {_EXAMPLE}"
        raise InvalidBody(INVALID_BODY_STATUS, message) from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise InvalidBody(INVALID_BODY_STATUS, f"Request body must be a JSON object {_EXAMPLE}, got {kind}")
    if "inputs" not in data:
        raise InvalidBody(
            INVALID_BODY_STATUS, f"Missing `inputs` (the prompt): send a JSON object {_EXAMPLE}"
        )
    if not isinstance(data["inputs"], str):
        kind = type(data["inputs"]).__name__
        raise InvalidBody(INVALID_BODY_STATUS, f"`inputs` must be a string (the prompt), got {kind}")
    if data.get("parameters") is None:
        data = {**data, "parameters": {}}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidBody(INVALID_PARAMETERS_STATUS, validation_messages(exc)) from None


# -- what comes back ----------------------------------------------------------------------------


def error_body(message: str | list[str], **extra: Any) -> dict[str, Any]:
    """The protocol's error body: ``{"error": message, ...extra}``."""
    return {"error": message, **extra}


def loading_body(model: str, estimated_time: float | None) -> dict[str, Any]:
    """The cold-start answer (status 503):
    ``{"error": "Model <id> is currently loading", "estimated_time": <seconds>}``."""
    body = error_body(f"Model {model} is currently loading")
    if estimated_time is not None:
        body["estimated_time"] = estimated_time
    return body


class LoadingInfo:
    """A parsed cold-start answer."""

    __slots__ = ("estimated_time", "message")

    def __init__(self, estimated_time: float | None, message: str) -> None:
        self.estimated_time = estimated_time
        """Seconds the server expects the load to take, if it said."""
        self.message = message
        """The server's message."""


def parse_loading(status: int, body: bytes, content_type: str | None = None) -> LoadingInfo | None:
    """Recognise the cold-start answer: a 503 whose JSON body has ``estimated_time`` or an error
    that mentions "loading".

    Args:
        status: The response status.
        body: The response body.
        content_type: The response's ``Content-Type``.

    Returns:
        The estimate and message, or ``None`` for any other answer.
    """
    if status != 503 or not body.lstrip().startswith(b"{"):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    estimate = data.get("estimated_time")
    error = data.get("error")
    seconds: float | None = None
    if isinstance(estimate, int | float) and not isinstance(estimate, bool):
        seconds = float(estimate) if math.isfinite(estimate) and estimate >= 0 else None
    elif not (isinstance(error, str) and "loading" in error.lower()):
        return None
    return LoadingInfo(seconds, error_message_from_body(body, content_type))


_MAX_MESSAGE_CHARS = 300
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_HIDDEN = re.compile(r"<(script|style|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def _shorten(text: str) -> str:
    text = _SPACE.sub(" ", text).strip()
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 1].rstrip() + "…"
    return text


def _from_json(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    error = data.get("error", data.get("message", data.get("detail")))
    if isinstance(error, str):
        return error
    if isinstance(error, list):
        return "; ".join(
            str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in error
        )
    if isinstance(error, dict):  # {"error": {"code": ..., "message": ...}} (the proxy's shape)
        inner = error.get("message")
        return inner if isinstance(inner, str) else json.dumps(error)
    return None


def error_message_from_body(body: bytes, content_type: str | None, *, reason: str = "") -> str:
    """Extract a short, human message from an error response body.

    Handles ``{"error": "..."}``, ``{"error": ["...", ...]}``, ``{"detail": ...}``, HTML pages
    (reduced to their title or first text) and plain text; falls back to the HTTP reason phrase for
    an empty body.

    Args:
        body: The raw response body.
        content_type: The response's ``Content-Type`` header.
        reason: The HTTP reason phrase, used when the body says nothing.

    Returns:
        At most about 300 characters of text.
    """
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return reason or "(empty body)"
    kind = (content_type or "").lower()
    if "json" in kind or text[:1] in "{[":
        try:
            message = _from_json(json.loads(text))
        except ValueError:
            message = None
        if message is not None:
            return _shorten(message)
    if "html" in kind or text[:1] == "<":
        title = _TITLE.search(text)
        if title and title.group(1).strip():
            return _shorten(html.unescape(title.group(1)))
        return _shorten(html.unescape(_TAG.sub(" ", _HIDDEN.sub(" ", text)))) or reason or "(HTML page)"
    return _shorten(text)


class PngText:
    """Keys of the text chunks written into saved PNGs (``GeneratedImage.save()``, the trainer's
    samples and class images), so that any of them can be read back the same way."""

    PROMPT = "prompt"
    NEGATIVE_PROMPT = "negative_prompt"
    SEED = "seed"
    PARAMETERS = "parameters"
    """The generation parameters, as sorted JSON."""
    STEPS = "steps"
    GUIDANCE_SCALE = "guidance_scale"
    MODEL = "model"


# -- host and token rules -----------------------------------------------------------------------


def _host(url_or_host: str) -> str:
    host = urlsplit(url_or_host).hostname if "://" in url_or_host else url_or_host
    return (host or "").lower().rstrip(".")


def is_hf_host(url_or_host: str) -> bool:
    """Whether a URL's host (or a host name) is Hugging Face's: ``huggingface.co``,
    ``huggingface.cloud`` and their subdomains, a trailing dot ignored."""
    host = _host(url_or_host)
    return any(host == suffix or host.endswith("." + suffix) for suffix in HF_HOST_SUFFIXES)


def is_loopback(url_or_host: str) -> bool:
    """Whether a URL's host (or a host name) is this machine: ``localhost`` or a loopback address.
    Only there may a token travel over plain ``http``."""
    host = _host(url_or_host).strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(token: str | None, url: str, *, hf_token: str | None = None) -> str | None:
    """The token to send to ``url``.

    Resolved in this order (first match wins): ``token`` (sent to any host), the ``HF_TOKEN``
    environment variable, the token saved by ``hf auth login``. A discovered token (the last two) is
    meant for Hugging Face and is only sent to Hugging Face hosts (:func:`is_hf_host`).

    Args:
        token: An explicit token, or ``None``.
        url: Where it would be sent.
        hf_token: ``HF_TOKEN`` as the caller read it (e.g. from a ``.env`` file); default the
            environment variable. A discovered token, like the saved one.

    Returns:
        The token, or ``None`` (send no ``Authorization``).

    Raises:
        ValueError: The token contains a line break or NUL (it would split the header).
    """
    if token is not None:
        token = token.strip()
        if any(c in token for c in "\r\n\0"):
            raise ValueError("token contains a line break or NUL character; check how it was read")
        return token or None
    if not is_hf_host(url):
        # A token found in the environment or on disk is meant for Hugging Face: never send it
        # to another host. Pass the token explicitly to authenticate elsewhere.
        return None
    discovered = (os.environ.get("HF_TOKEN", "") if hf_token is None else hf_token).strip()
    if not discovered:
        from huggingface_hub import get_token

        discovered = (get_token() or "").strip()
    return discovered or None
