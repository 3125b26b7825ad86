"""The job API: `POST /v1/jobs`, `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/events`,
`DELETE /v1/jobs/{id}` and `GET /v1/images/{id}`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from ..budget import check_budget
from ..deps import StateDep, identify_caller
from ..jobs import JobRecord
from ..logs import request_id_var
from ..schemas import ErrorResponse, JobBody, JobView
from .generate import result_json

__all__ = ["router"]

router = APIRouter(tags=["jobs"])

MAX_IDEMPOTENCY_KEY = 255

_OWNER_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorResponse,
        "description": "`unauthorized`: API keys are configured; none or a wrong one.",
    },
    404: {"model": ErrorResponse, "description": "`not_found`: no such job or image for this caller."},
    503: {"model": ErrorResponse, "description": "`store_unavailable`: the shared store is down."},
}


async def owned_job(job_id: str, request: Request, state: StateDep) -> tuple[str, JobRecord]:
    """The caller and its job, checked before a stream starts (a stream cannot answer 404 later).

    Raises:
        Unauthorized: API keys are configured and the request has none, or an unknown one.
        NotFound: No such job for this caller.
    """
    owner = await identify_caller(request, state)
    return owner, await state.jobs.get(owner, job_id)


OwnedJobDep = Annotated[tuple[str, JobRecord], Depends(owned_job)]


def view(record: JobRecord, request: Request) -> JobView:
    """The caller's view of a job."""
    url = None
    if record.image_id is not None:
        url = str(request.url_for("get_image", image_id=record.image_id))
    return JobView(
        id=record.id,
        status=record.status,
        position=record.position,
        eta_s=record.eta_s,
        seed=record.seed,
        result_url=url,
        error=record.error,
        created_at=record.created_at,
        finished_at=record.finished_at,
    )


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobView,
    responses={
        200: {"model": JobView, "description": "The job an earlier request with this Idempotency-Key made."},
        409: {
            "model": ErrorResponse,
            "description": "`idempotency_conflict`: the key was used for another body.",
        },
        422: {"model": ErrorResponse, "description": "`validation_error`, or a refused `webhook_url`."},
        429: {
            "model": ErrorResponse,
            "description": "`rate_limited` or `quota_exceeded` (with `Retry-After`).",
        },
        **_OWNER_ERRORS,
    },
    summary="Start a generation job",
)
async def create_job(
    body: JobBody,
    request: Request,
    response: Response,
    state: StateDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=MAX_IDEMPOTENCY_KEY,
            description="Repeat a request safely: the same key and body return the first job.",
        ),
    ] = None,
) -> JobView:
    """Answer at once with the job's id; poll `GET /v1/jobs/{id}`, read its events, or get a
    signed webhook at `webhook_url` when it finishes."""
    owner = await identify_caller(request, state)
    check_budget(state.settings, body)
    record, created = await state.jobs.create(
        owner,
        body,
        idempotency_key=idempotency_key,
        request_id=request_id_var.get(),
        base_url=str(request.base_url),
    )
    if not created:
        response.status_code = 200
    response.headers["Location"] = str(request.url_for("get_job", job_id=record.id))
    return view(record, request)


@router.get(
    "/v1/jobs/{job_id}", response_model=JobView, responses=_OWNER_ERRORS, summary="Where a job stands"
)
async def get_job(job_id: str, request: Request, state: StateDep) -> JobView:
    """Status, place in line, ETA of a loading model, and the result URL or the error."""
    return view(await state.jobs.get(await identify_caller(request, state), job_id), request)


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "Server-Sent Events, the same as `POST /generate/stream`: the events so far, "
            "then new ones, ending with `image` (a `GenerateResult`) or `error`."
        },
        **{
            status: {
                "description": spec["description"],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
            }
            for status, spec in _OWNER_ERRORS.items()
        },
    },
    summary="Follow a job's progress",
)
async def job_events(job: OwnedJobDep, state: StateDep) -> AsyncIterator[ServerSentEvent]:
    """Readable with `EventSource` (a GET) when the caller is identified by its IP, or `fetch()`."""
    owner, record = job
    async for name, data in state.jobs.events(owner, record.id):
        if name == "image":
            result = await state.jobs.image(owner, data["image_id"])
            yield ServerSentEvent(event="image", data=result_json(result, record.request_id))
        else:
            yield ServerSentEvent(event=name, data=data)


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobView,
    responses={
        204: {"description": "The job had finished: it and its image are deleted."},
        **_OWNER_ERRORS,
    },
    summary="Cancel a job, or delete a finished one",
)
async def delete_job(job_id: str, request: Request, state: StateDep) -> Response | JobView:
    """A job still queued or running is canceled (its image is not charged); a finished job is
    deleted with its image."""
    record = await state.jobs.cancel(await identify_caller(request, state), job_id)
    if record is None:
        return Response(status_code=204)
    return view(record, request)


@router.get(
    "/v1/images/{image_id}",
    response_class=Response,
    responses={
        200: {
            "description": "The image bytes (`X-Seed` header).",
            "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
        },
        **_OWNER_ERRORS,
    },
    summary="An image made by a job or the OpenAI-compatible route",
)
async def get_image(image_id: str, request: Request, state: StateDep) -> Response:
    """Kept for `SDPROXY_JOB_TTL_S` seconds, for the caller that made it."""
    result = await state.jobs.image(await identify_caller(request, state), image_id)
    headers = {"X-Seed": str(result.seed), "Cache-Control": "private, max-age=3600"}
    return Response(result.data, media_type=result.content_type, headers=headers)
