"""`POST /generate` (the image, or JSON) and `POST /generate/stream` (Server-Sent Events)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from ..budget import within_budget
from ..deps import AdmissionDep, AppState, ClientGone, StreamAdmissionDep, while_connected
from ..errors import ProxyError, error_body
from ..logs import prompt_fields, request_id_var
from ..schemas import ErrorResponse, GenerateBody, GenerateResult
from ..service import GenerationResult

__all__ = ["IMAGE_HEADERS", "result_json", "router"]

logger = logging.getLogger("proxy.generate")

router = APIRouter(tags=["generate"])

IMAGE_HEADERS = ("X-Seed", "X-Compute-Time", "X-Total-Time", "X-Cold-Start-Wait", "X-Cache")
"""Headers of an image answer (with `X-Request-ID` and `Retry-After`, exposed to CORS)."""

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorResponse,
        "description": "`unauthorized`: API keys are configured; none or a wrong one.",
    },
    413: {"model": ErrorResponse, "description": "`payload_too_large`"},
    422: {
        "model": ErrorResponse,
        "description": "`validation_error`: the message names the field, or the cost budget "
        "(`SDPROXY_MAX_MEGAPIXEL_STEPS`) or prompt length the request is over.",
    },
    429: {"model": ErrorResponse, "description": "`rate_limited` or `quota_exceeded` (with `Retry-After`)."},
    502: {
        "model": ErrorResponse,
        "description": "`upstream_auth`, `upstream_not_found`, `upstream_credits`, `upstream_rejected`, "
        "`upstream_error`: the model server failed or refused the proxy's configuration.",
    },
    503: {"model": ErrorResponse, "description": "`model_loading` or `busy` (with `Retry-After`)."},
    504: {"model": ErrorResponse, "description": "`upstream_timeout`"},
}

# The stream's own media type is text/event-stream; its early errors are JSON, said explicitly.
_STREAM_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {
        "description": spec["description"],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for status, spec in _ERRORS.items()
    if status in (401, 413, 422, 429)
}

_BINARY = {"schema": {"type": "string", "format": "binary"}}


def result_json(result: GenerationResult, request_id: str | None) -> dict[str, Any]:
    """The `GenerateResult` of an image: the JSON answer, and the data of an `image` event."""
    return GenerateResult(
        image=base64.b64encode(result.data).decode("ascii"),
        content_type=result.content_type,  # type: ignore[arg-type]
        seed=result.seed,
        timings=result.timings,
        request_id=request_id,
    ).model_dump()


def _log_result(
    state: AppState, body: GenerateBody, caller: str, source: str, result: GenerationResult
) -> None:
    logger.info(
        "generated",
        extra={
            "client": caller,
            "source": source,
            "seed": result.seed,
            "bytes": result.nbytes,
            "total_s": result.timings.total_s,
            "cold_start_wait_s": result.timings.cold_start_wait_s,
            **prompt_fields(body.prompt, include_text=state.settings.log_prompts),
        },
    )


def _log_error(state: AppState, body: GenerateBody, caller: str, exc: ProxyError) -> None:
    logger.warning(
        "generate failed: %s",
        exc.code,
        extra={
            "client": caller,
            "code": exc.code,
            "status": exc.status_code,
            **prompt_fields(body.prompt, include_text=state.settings.log_prompts),
        },
    )


@router.post(
    "/generate",
    response_class=Response,
    dependencies=[Depends(within_budget)],
    responses={
        200: {
            "model": GenerateResult,
            "description": "The image as produced (PNG or JPEG), or JSON with `Accept: application/json`. "
            "Headers: `X-Seed`, `X-Compute-Time`, `X-Total-Time`, `X-Cold-Start-Wait`, `X-Cache`, "
            "`X-Request-ID`.",
            "content": {
                "image/png": _BINARY,
                "image/jpeg": _BINARY,
                "image/webp": _BINARY,
            },
        },
        **_ERRORS,
    },
    summary="Generate one image",
)
async def generate(body: GenerateBody, request: Request, admission: AdmissionDep) -> Response:
    """Generate one image, waiting for a cold model up to the configured time.

    Answers the image bytes with the seed and timings in headers, or with
    `Accept: application/json` the image as base64 in `GenerateResult`.
    """
    state = admission.state
    try:
        result, source = await while_connected(request, state.service.generate(body))
    except BaseException as exc:
        await admission.release()  # no image: the caller keeps its quota
        if isinstance(exc, ClientGone):
            logger.info("the caller left before its image was ready", extra={"client": admission.caller})
        elif isinstance(exc, ProxyError):
            await state.limiter.count(admission.caller, "errors")
            _log_error(state, body, admission.caller, exc)
        raise
    await admission.deliver()
    _log_result(state, body, admission.caller, source, result)
    request_id = request_id_var.get()
    timings = result.timings
    headers = {
        "X-Seed": str(result.seed),
        "X-Total-Time": f"{timings.total_s:.3f}",
        "X-Cold-Start-Wait": f"{timings.cold_start_wait_s:.3f}",
        "X-Cache": "hit" if source == "cache" else "coalesced" if source == "coalesced" else "miss",
        "Cache-Control": "no-store",
    }
    if timings.compute_s is not None:
        headers["X-Compute-Time"] = f"{timings.compute_s:.3f}"
    if "application/json" in request.headers.get("accept", ""):
        content = json.dumps(result_json(result, request_id), separators=(",", ":"))
        return Response(content, media_type="application/json", headers=headers)
    return Response(result.data, media_type=result.content_type, headers=headers)


@router.post(
    "/generate/stream",
    response_class=EventSourceResponse,
    dependencies=[Depends(within_budget)],
    responses={
        200: {
            "description": 'Server-Sent Events: `queued` `{"position"}`, `loading` `{"eta_s"}` (a cold '
            "model; again whenever the ETA moves), `generating` `{}`, then `image` (a `GenerateResult`) "
            "or `error` (an `ErrorResponse`). Errors found before the stream starts (validation, "
            "rate limit, quota, API key) are ordinary JSON error answers instead.",
        },
        **_STREAM_ERRORS,
    },
    summary="Generate one image, streaming progress",
)
async def generate_stream(
    body: GenerateBody, request: Request, admission: StreamAdmissionDep
) -> AsyncIterator[ServerSentEvent]:
    """Generate one image and report progress as Server-Sent Events (read it with `fetch()`:
    `EventSource` cannot POST)."""
    state = admission.state
    events: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
    task = asyncio.create_task(
        state.service.generate(body, listener=lambda name, data: events.put_nowait((name, data)))
    )
    task.add_done_callback(lambda _: events.put_nowait(None))
    request_id = request_id_var.get()
    try:
        while (event := await events.get()) is not None:
            yield ServerSentEvent(event=event[0], data=event[1])
        try:
            result, source = task.result()
        except ProxyError as exc:
            await state.limiter.count(admission.caller, "errors")
            _log_error(state, body, admission.caller, exc)
            yield ServerSentEvent(event="error", data=error_body(exc))
            return
        except Exception:
            logger.exception("unhandled error in a stream")
            error = ProxyError("Internal error. The request id helps the operator.")
            yield ServerSentEvent(event="error", data=error_body(error))
            return
        await admission.deliver()
        _log_result(state, body, admission.caller, source, result)
        yield ServerSentEvent(event="image", data=result_json(result, request_id))
    finally:
        if not task.done():
            # The caller left: this request stops waiting, and the call stops with it unless
            # another request shares it.
            task.cancel()
