"""The public HTTP contract of the proxy: what a web page sends and what it gets back."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sdclient import Timings
from sdclient.protocol import GenerationOptions, Guidance, ImageSide, Prompt, Seed, Steps

__all__ = [
    "MAX_IMAGES",
    "MAX_PROMPT_LENGTH",
    "ErrorDetail",
    "ErrorResponse",
    "GenerateBody",
    "GenerateResult",
    "Health",
    "JobBody",
    "JobStatus",
    "JobView",
    "ModelStatusOut",
    "Timings",
    "UsageReport",
]

MAX_PROMPT_LENGTH = 2000
"""Longest prompt or negative prompt, in characters (Stable Diffusion reads about 77 tokens anyway)."""

MAX_IMAGES = 4
"""Most images one request may ask for (the OpenAI route's `n`): each counts against the caller's quota."""

MAX_SEED = 2**32 - 1
"""Seeds are 32-bit unsigned integers: exact in JavaScript numbers and accepted by every pipeline."""

MIN_SIDE, MAX_SIDE = 64, 1024
"""Image width and height in pixels that a page may ask for (the protocol allows 1 to 4096)."""
MAX_STEPS = 150
"""Most denoising steps a page may ask for (the protocol allows 1000)."""
MAX_GUIDANCE = 30.0
"""Largest guidance scale a page may ask for (the protocol allows 100)."""


class GenerateBody(GenerationOptions):
    """The JSON body of `POST /generate` and `POST /generate/stream`: the protocol's generation
    options (`sdclient.protocol.GenerationOptions`) with the proxy's narrower bounds. Unset fields use
    the model's defaults; without a seed the proxy draws one and returns it."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "a watercolor fox in the snow", "seed": 1234}]},
    )

    prompt: Annotated[
        Prompt,
        Field(
            max_length=MAX_PROMPT_LENGTH,
            json_schema_extra={"pattern": r"\S"},  # checked by `_not_blank`, with a readable message
            description="What to draw (not blank).",
        ),
    ]
    negative_prompt: Annotated[
        str | None, Field(max_length=MAX_PROMPT_LENGTH, description="What to keep out of the image.")
    ] = None
    width: Annotated[
        ImageSide | None,
        Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8, description="Pixels, multiple of 8."),
    ] = None
    height: Annotated[
        ImageSide | None,
        Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8, description="Pixels, multiple of 8."),
    ] = None
    num_inference_steps: Annotated[Steps | None, Field(le=MAX_STEPS, description="Denoising steps.")] = None
    guidance_scale: Annotated[
        Guidance | None, Field(le=MAX_GUIDANCE, description="How closely to follow the prompt.")
    ] = None
    seed: Annotated[Seed | None, Field(le=MAX_SEED, description="Same seed + same body = same image.")] = None

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is blank: describe the image to generate")
        return prompt

    def fingerprint(self) -> str:
        """A stable hash of every field (seed included): the key for coalescing and caching."""
        canonical = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class GenerateResult(BaseModel):
    """`POST /generate` with `Accept: application/json`, and the `image` event of the stream."""

    image: str = Field(description="The image bytes, base64-encoded.")
    content_type: Literal["image/png", "image/jpeg", "image/webp"]
    seed: int
    timings: Timings
    request_id: str | None = Field(description="This request's `X-Request-ID`.")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable: `rate_limited`, `model_loading`, ...")
    message: str = Field(description="Readable by a person: what went wrong and what to do.")
    retry_after: int | None = Field(
        default=None, description="Seconds to wait before trying again, where that applies."
    )


class ErrorResponse(BaseModel):
    """Every error the proxy answers, whatever its status code."""

    error: ErrorDetail


class ModelStatusOut(BaseModel):
    """`GET /status`: what the proxy knows of the model, without generating anything."""

    state: Literal["unknown", "ready", "loading", "unavailable"]
    eta_s: float | None = Field(description="Seconds until the model is expected to be ready, while loading.")
    message: str | None


class Health(BaseModel):
    status: Literal["ok", "ready"]
    model_state: Literal["unknown", "ready", "loading", "unavailable"] | None = None


class UsageReport(BaseModel):
    """`GET /usage` (admin key): counters of this worker process."""

    pid: int = Field(description="The worker that answered: `upstream` and `queue` are its own.")
    store: Literal["memory", "redis"] = Field(description="Where `clients` and `cache` are kept.")
    upstream: dict[str, Any] = Field(
        description="This worker's client usage (requests, images, compute seconds...); a usage db "
        "(`SDPROXY_USAGE_DB`) sums every worker's."
    )
    clients: dict[str, dict[str, int]] = Field(
        description="Per-client counts (API-key hash or IP), of every instance with Redis."
    )
    cache: dict[str, int] = Field(
        description="`items`, `bytes`, `hits`, `misses` and `max_bytes` of the cache."
    )
    queue: dict[str, int] = Field(
        description="This worker's `active`, `waiting`, `refused`, `max_concurrency`, `queue_size`, "
        "`upstream_calls`, `followed` (calls another instance made) and `abandoned` (calls every "
        "visitor waiting for them left)."
    )


class JobBody(GenerateBody):
    """The body of `POST /v1/jobs`: the same fields as `/generate`, and where to send a webhook."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "a watercolor fox", "seed": 1234, "webhook_url": "https://app.example.com/hook"}
            ]
        },
    )

    webhook_url: str | None = Field(
        default=None,
        max_length=2048,
        description="Receives the finished job as a signed `POST` (see docs/proxy.md, Webhooks).",
    )

    def generation(self) -> GenerateBody:
        """The generation part alone (the webhook does not change the image), already validated."""
        fields = {name: getattr(self, name) for name in GenerateBody.model_fields}
        return GenerateBody.model_construct(_fields_set=self.model_fields_set - {"webhook_url"}, **fields)


JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]


class JobView(BaseModel):
    """`POST /v1/jobs`, `GET /v1/jobs/{id}` and `DELETE /v1/jobs/{id}`: where a job stands."""

    id: str = Field(description="Unguessable; only the caller that made the job can read it.")
    status: JobStatus
    position: int | None = Field(
        default=None, description="While queued: calls ahead in line (0: about to start)."
    )
    eta_s: float | None = Field(default=None, description="While the model loads: seconds left, about.")
    seed: int | None = Field(default=None, description="The seed of the image, once it is made.")
    result_url: str | None = Field(default=None, description="`GET` it for the image, once succeeded.")
    error: ErrorDetail | None = Field(default=None, description="Why it failed or was canceled.")
    created_at: float = Field(description="Unix seconds.")
    finished_at: float | None = None
