"""`POST /v1/images/generations`: OpenAI's images API, for the OpenAI SDKs and the Vercel AI SDK.

The body is OpenAI's (`model`, `prompt`, `n`, `size` as `"WIDTHxHEIGHT"`, `response_format`,
`user`) plus this proxy's own fields as extras (`seed`, `negative_prompt`, `num_inference_steps`,
`guidance_scale`: `extra_body=` in the OpenAI SDKs). The proxy serves one model: `model` is
accepted as any name and not used. Errors on this route have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the proxy's own codes.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..budget import check_budget
from ..deps import ClientGone, admit_caller, get_state, identify_caller, while_connected
from ..errors import ProxyError, describe_validation_errors
from ..schemas import MAX_IMAGES, MAX_PROMPT_LENGTH, MAX_SEED, GenerateBody

__all__ = ["ImageGenerationBody", "router"]

_SIZE = re.compile(r"^(\d{2,4})x(\d{2,4})$")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error(
    status: int, message: str, code: str, param: str | None = None, **headers: str
) -> JSONResponse:
    """An error in OpenAI's shape (its SDKs raise the matching exception class per status)."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_response(errors: list[Any]) -> JSONResponse:
    loc = [str(item) for item in (errors[0].get("loc", ()) if errors else ()) if item != "body"]
    return openai_error(400, describe_validation_errors(errors), "validation_error", ".".join(loc) or None)


class OpenAIRoute(APIRoute):
    """A route whose every error, validation included, is answered in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _validation_response(list(exc.errors()))
            except ProxyError as exc:
                headers = {} if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
                return openai_error(exc.status_code, exc.message, exc.code, **headers)

        return answer


router = APIRouter(tags=["openai"], route_class=OpenAIRoute)


class ImageGenerationBody(BaseModel):
    """OpenAI's `images.generate` body, with this proxy's generation fields as extras."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"model": "sd", "prompt": "a watercolor fox", "size": "512x512"}]},
    )

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_LENGTH, description="What to draw.")
    model: str | None = Field(
        default=None, max_length=200, description="Any name: the proxy serves one model."
    )
    n: int = Field(default=1, ge=1, le=MAX_IMAGES, description="How many images (different seeds).")
    size: str | None = Field(default=None, description='`"WIDTHxHEIGHT"`, e.g. `"512x512"`.')
    response_format: Literal["b64_json", "url"] = Field(
        default="b64_json", description="`url`: a `GET /v1/images/{id}` URL, readable by the same caller."
    )
    user: str | None = Field(default=None, max_length=200, description="Your end user's id (logged only).")
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Seed of the first image (+1 each)."
    )
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_LENGTH)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None

    def generations(self) -> list[GenerateBody]:
        """One validated `GenerateBody` per image.

        Raises:
            ValidationError: `size` or an extra field is out of the proxy's bounds.
        """
        width = height = None
        if self.size is not None and self.size != "auto":
            match = _SIZE.match(self.size)
            if match is None:
                raise ValidationError.from_exception_data(
                    "ImageGenerationBody",
                    [
                        {
                            "type": "value_error",
                            "loc": ("size",),
                            "input": self.size,
                            "ctx": {"error": 'write "WIDTHxHEIGHT", e.g. "512x512"'},
                        }
                    ],
                )
            width, height = int(match[1]), int(match[2])
        fields = self.model_dump(
            include={"prompt", "negative_prompt", "num_inference_steps", "guidance_scale"}
        )
        return [
            GenerateBody.model_validate(
                {
                    **fields,
                    "width": width,
                    "height": height,
                    "seed": None if self.seed is None else (self.seed + i) % (MAX_SEED + 1),
                }
            )
            for i in range(self.n)
        ]


def _format(content_type: str) -> str:
    return content_type.removeprefix("image/")


@router.post(
    "/v1/images/generations",
    summary="Generate images (OpenAI-compatible)",
    responses={400: {"description": "OpenAI-shaped error: `invalid_request_error`."}},
)
async def generations(body: ImageGenerationBody, request: Request) -> dict[str, Any]:
    """OpenAI's `POST /v1/images/generations`: `{"created", "data": [{"b64_json" | "url"}]}`."""
    state = await get_state(request)
    caller = await identify_caller(request, state)
    try:
        bodies = body.generations()
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    check_budget(state.settings, bodies[0], images=len(bodies))
    admission = await admit_caller(state, caller, images=len(bodies))
    try:
        results = await while_connected(request, asyncio.gather(*(state.service.generate(b) for b in bodies)))
    except BaseException as exc:
        await admission.release()
        if not isinstance(exc, ClientGone):
            await state.limiter.count(caller, "errors")
        raise
    await admission.deliver()
    data: list[dict[str, Any]] = []
    for result, _ in results:
        if body.response_format == "url":
            image_id = await state.jobs.save_image(caller, result)
            data.append({"url": str(request.url_for("get_image", image_id=image_id)), "revised_prompt": None})
        else:
            data.append({"b64_json": base64.b64encode(result.data).decode("ascii"), "revised_prompt": None})
    first = results[0][0]
    return {
        "created": int(time.time()),
        "data": data,
        "output_format": _format(first.content_type),
        "size": body.size or "auto",
    }
