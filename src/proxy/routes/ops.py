"""`GET /status` for pages, `/healthz` and `/readyz` for orchestrators, `/usage` for the operator."""

from __future__ import annotations

import os

from fastapi import APIRouter

from ..deps import AdminDep, StateDep
from ..errors import NotReady, bounded_seconds
from ..schemas import ErrorResponse, Health, ModelStatusOut, UsageReport

__all__ = ["router"]

router = APIRouter(tags=["ops"])

STATUS_MESSAGES: dict[str, str | None] = {
    "unknown": None,
    "ready": None,
    "loading": "The model is loading; requests wait for it or answer 503 model_loading.",
    "unavailable": "The model server cannot serve requests right now; the operator's log says why.",
}
"""The message of `GET /status` per state (anonymous: nothing of the upstream's own text)."""


@router.get("/status", response_model=ModelStatusOut, summary="What the proxy knows of the model")
async def status(state: StateDep) -> ModelStatusOut:
    """`ready`, `loading` (with `eta_s`, seconds left), `unavailable` (an error retrying will not
    fix, e.g. a refused token) or `unknown` (nothing sent yet). Sends nothing upstream."""
    model = state.service.status()
    eta = None if model.eta_s is None else round(bounded_seconds(model.eta_s), 1)
    # The proxy's own words: the client's message is the upstream's text (its URL, its errors).
    return ModelStatusOut(state=model.state, eta_s=eta, message=STATUS_MESSAGES[model.state])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": ErrorResponse, "description": "`not_ready`: starting or stopping."}},
    summary="The proxy can take requests",
)
async def readyz(state: StateDep) -> Health:
    """Ready once the app has started its client; the model's own state is reported alongside
    (a loading model still lets the proxy answer `/status` and streams)."""
    if not state.started:
        raise NotReady("The proxy is starting or stopping.")
    return Health(status="ready", model_state=state.service.status().state)


@router.get(
    "/usage",
    response_model=UsageReport,
    dependencies=[AdminDep],
    responses={
        401: {"model": ErrorResponse, "description": "`unauthorized`: missing or wrong admin key."},
        404: {"model": ErrorResponse, "description": "`not_found`: no admin key is configured."},
    },
    summary="Usage counters (admin key)",
)
async def usage(state: StateDep) -> UsageReport:
    """The client's usage (requests, images, compute seconds, cold starts, failures) and the
    queue of this worker process, and the per-client counts and cache of the store (every
    instance's with Redis). Send the admin key as `Authorization: Bearer` or `X-Admin-Key`."""
    service = state.service
    return UsageReport(
        pid=os.getpid(),
        store="redis" if state.store.shared else "memory",
        upstream=service.client.usage.model_dump(mode="json"),
        clients=await state.store.counts(),
        cache={**await state.store.cache_stats(), "max_bytes": service.cache_max_bytes},
        queue={
            **service.admission.snapshot(),
            "upstream_calls": service.upstream_calls,
            "followed": service.followed,
            "abandoned": service.abandoned,
        },
    )
