"""The public HTTP contract of the proxy: what a web page sends and what it gets back."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "MAX_PROMPT_LENGTH",
    "ErrorDetail",
    "ErrorResponse",
    "GenerateBody",
    "GenerateResult",
    "Health",
    "ModelStatusOut",
    "Timings",
    "UsageReport",
]

MAX_PROMPT_LENGTH = 2000
"""Longest prompt or negative prompt, in characters (Stable Diffusion reads about 77 tokens anyway)."""

MAX_SEED = 2**32 - 1
"""Seeds are 32-bit unsigned integers: exact in JavaScript numbers and accepted by every pipeline."""


def _json_number(value: Any) -> Any:
    """Numbers must be JSON numbers: `"512"` or `true` are refused rather than converted."""
    if isinstance(value, bool | str | bytes):
        raise ValueError("Input should be a number")
    return value


class GenerateBody(BaseModel):
    """The JSON body of `POST /generate` and `POST /generate/stream`. Unset fields use the model's
    defaults; without a seed the proxy draws one and returns it."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "a watercolor fox in the snow", "seed": 1234}]},
    )

    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_LENGTH,
        json_schema_extra={"pattern": r"\S"},  # checked by `_not_blank`, with a readable message
        description="What to draw (not blank).",
    )
    negative_prompt: str | None = Field(
        default=None, max_length=MAX_PROMPT_LENGTH, description="What to keep out of the image."
    )
    width: int | None = Field(
        default=None, ge=64, le=1024, multiple_of=8, description="Pixels, multiple of 8."
    )
    height: int | None = Field(
        default=None, ge=64, le=1024, multiple_of=8, description="Pixels, multiple of 8."
    )
    num_inference_steps: int | None = Field(default=None, ge=1, le=150, description="Denoising steps.")
    guidance_scale: float | None = Field(
        default=None, ge=0, le=30, allow_inf_nan=False, description="How closely to follow the prompt."
    )
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Same seed + same body = same image."
    )

    @field_validator("width", "height", "num_inference_steps", "guidance_scale", "seed", mode="before")
    @classmethod
    def _numbers(cls, value: Any) -> Any:
        return _json_number(value)

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


class Timings(BaseModel):
    """Where the time went, in seconds."""

    total_s: float = Field(description="From the proxy's upstream call to the image (0 for a cache hit).")
    compute_s: float | None = Field(description="What the model server reported (`x-compute-time`).")
    cold_start_wait_s: float = Field(description="Time spent waiting for a cold model to load.")


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

    pid: int = Field(
        description="Counters are per process: with several workers, ask each or use a usage db."
    )
    upstream: dict[str, Any] = Field(description="The client's usage (requests, images, compute seconds...).")
    clients: dict[str, dict[str, int]] = Field(description="Per-client counts (API-key hash or IP).")
    cache: dict[str, int]
    queue: dict[str, int]
