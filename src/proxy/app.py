"""`create_app()`: the FastAPI application, owning one `SDClient` for its lifetime."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

import sdclient

from .admission import AdmissionQueue
from .config import ENV_PREFIX, ConfigError, Settings, load_settings
from .deps import AppState, LifespanState
from .errors import ProxyError, SecretRegistry, current_secrets, error_body, install_error_handlers
from .jobs import JobManager
from .limits import ClientLimiter
from .middleware import (
    REQUEST_ID_HEADER,
    BodyLimitMiddleware,
    LoadSheddingMiddleware,
    RelativeRedirectMiddleware,
    RequestContextMiddleware,
)
from .routes import generate, jobs, openai, ops
from .routes.generate import IMAGE_HEADERS
from .service import GenerationService
from .store import MemoryStore, Store
from .webhooks import WebhookSender

__all__ = ["create_app", "open_usage_tracker"]

logger = logging.getLogger("proxy")

CONNECT_TIMEOUT_S = 10.0


class _CORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware, with refused preflights answered in the proxy's error shape."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 400:
            error = ProxyError(f"CORS preflight refused: {bytes(response.body).decode()}.")
            error.code = "cors_refused"
            headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
            headers.pop("content-type", None)
            return JSONResponse(error_body(error), status_code=400, headers=headers)
        return response


def _unique_id(route: APIRoute) -> str:
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def create_app(settings: Settings | None = None, *, client: sdclient.SDClient | None = None) -> FastAPI:
    """Build the proxy application.

    Args:
        settings: The configuration; read from the environment and `.env` when omitted.
        client: An `SDClient` to use instead of building one from `settings` (it is then not
            closed by the app). One client, and so one connection pool and one shared cold-start
            wait, serves every request of the app.

    Returns:
        The FastAPI app; serve it with uvicorn (`sdproxy serve`) or any ASGI server.

    Raises:
        ConfigError: The configuration is incomplete or unsafe.
    """
    settings = settings if settings is not None else load_settings()
    if client is None and settings.usage_db is not None:
        open_usage_tracker(settings).close()  # a broken file is a configuration error, now
    token = settings.resolve_token()
    secrets = SecretRegistry()
    secrets.add(token)
    for key in (settings.admin_key, settings.webhook_secret, settings.redis_url, *settings.api_keys):
        secrets.add(key.get_secret_value() if key is not None else None)
    logging.getLogger("proxy").setLevel(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[LifespanState]:
        current_secrets.set(secrets)  # for the lifespan's log lines and the tasks it starts
        own_client = client is None
        sd = client or sdclient.SDClient(
            settings.model or "",
            provider=settings.provider,
            token=token,
            base_url=settings.base_url,
            router_url=settings.router_url,
            hub_url=settings.hub_url,
            timeout=httpx.Timeout(settings.upstream_timeout, connect=CONNECT_TIMEOUT_S),
            max_wait_for_model=settings.max_wait_for_model,
            max_retries=settings.max_retries,
            # A visitor's request is one upstream job: when the answer times out after sending, the
            # server may still be generating it, and a re-send would queue a second one.
            retry=sdclient.RetryPolicy(retry_read_timeouts=False),
            http_backend=settings.http_backend,
            usage=open_usage_tracker(settings) if settings.usage_db else None,
        )
        store = _open_store(settings)
        await store.start()
        service = GenerationService(
            sd,
            store=store,
            admission=AdmissionQueue(settings.max_concurrency, settings.queue_size),
            cache_max_bytes=settings.cache_max_bytes,
            cache_ttl_s=settings.cache_ttl_s,
            coalesce=settings.coalesce,
            global_max_concurrency=settings.global_max_concurrency,
            flight_lease_s=_flight_lease(settings),
        )
        limiter = ClientLimiter(
            store,
            per_minute=settings.rate_limit_per_minute,
            burst=settings.rate_limit_burst,
            daily_quota=settings.daily_quota,
            key_monthly_budget=settings.key_monthly_budget,
            auth_failures_per_minute=settings.auth_failures_per_minute,
            fail_open=settings.fail_open,
        )
        webhooks = None
        if settings.webhook_secret is not None:
            webhooks = WebhookSender(
                settings.webhook_secret.get_secret_value(),
                allow_private=settings.webhook_allow_private,
                max_attempts=settings.webhook_max_attempts,
                backoff_s=settings.webhook_backoff_s,
            )
        job_manager = JobManager(store, service, limiter, ttl_s=settings.job_ttl_s, webhooks=webhooks)
        state = AppState(
            settings=settings,
            store=store,
            service=service,
            limiter=limiter,
            jobs=job_manager,
            secrets=secrets,
        )
        app.state.proxy = (
            state  # for code that holds the app (tests, embedding); requests use the lifespan state
        )
        warmup = asyncio.create_task(_warm_up(sd)) if settings.warmup else None
        state.started = True
        logger.info(
            "proxy started",
            extra={
                "upstream": settings.upstream_url,
                "token": "set" if token else "none",
                "max_concurrency": settings.max_concurrency,
                "queue_size": settings.queue_size,
                "cors_origins": settings.allowed_origins,
                "api_keys": len(settings.api_keys),
                "store": "redis" if store.shared else "memory",
            },
        )
        try:
            yield {"proxy": state}
        finally:
            state.started = False
            if warmup is not None and not warmup.done():
                warmup.cancel()
            await job_manager.aclose()
            await store.aclose()
            if own_client:
                await sd.aclose()
            logger.info("proxy stopped")

    app = FastAPI(
        title="sdproxy",
        summary="Text-to-image for web pages; the Hugging Face token stays on the server.",
        version=_version(),
        lifespan=lifespan,
        generate_unique_id_function=_unique_id,
    )
    install_error_handlers(app)
    app.include_router(generate.router)
    app.include_router(jobs.router)
    app.include_router(openai.router)
    app.include_router(ops.router)
    if settings.static_dir is not None:
        # Its own path: the static mount never answers OPTIONS or POST meant for the API.
        app.mount("/app", StaticFiles(directory=settings.static_dir, html=True), name="app")

        @app.get("/", include_in_schema=False)
        async def root() -> RedirectResponse:
            return RedirectResponse("/app/")

    # Added innermost first: RequestContext (request id) -> CORS -> LoadShedding -> BodyLimit
    # -> RelativeRedirect -> app.
    app.add_middleware(RelativeRedirectMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(LoadSheddingMiddleware)
    if settings.allowed_origins:
        app.add_middleware(
            _CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_credentials=settings.allow_credentials,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[
                "Content-Type",
                "Accept",
                "Authorization",
                "X-API-Key",
                "Idempotency-Key",
                REQUEST_ID_HEADER,
            ],
            expose_headers=[*IMAGE_HEADERS, REQUEST_ID_HEADER, "Retry-After"],
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware, secrets=secrets)  # outermost: every answer gets a request id
    return app


def open_usage_tracker(settings: Settings) -> sdclient.UsageTracker:
    """The usage tracker of `SDPROXY_USAGE_DB` (in memory when unset), opened and read once.

    Raises:
        ConfigError: The file cannot serve as a usage database (not SQLite, corrupt, unreadable,
            locked); the message names the variable and what to do.
    """
    if settings.usage_db is None:
        return sdclient.UsageTracker()
    tracker: sdclient.UsageTracker | None = None
    try:
        tracker = sdclient.UsageTracker(settings.usage_db)
        tracker.snapshot()
    except (sqlite3.Error, OSError) as exc:
        if tracker is not None:
            tracker.close()
        raise ConfigError(
            f"{ENV_PREFIX}USAGE_DB {str(settings.usage_db)!r} cannot be used as the usage database "
            f"({type(exc).__name__}: {exc}): move the file away to start counting afresh, or point "
            f"{ENV_PREFIX}USAGE_DB at another file"
        ) from None
    return tracker


def _open_store(settings: Settings) -> Store:
    """Redis when `SDPROXY_REDIS_URL` is set, else this process's memory."""
    if settings.redis_url is None:
        return MemoryStore()
    from .redis_store import RedisStore

    return RedisStore(settings.redis_url.get_secret_value(), prefix=settings.redis_prefix)


def _flight_lease(settings: Settings) -> float:
    """The longest one upstream call can take: every attempt's timeout plus the cold-start wait."""
    return settings.upstream_timeout * (settings.max_retries + 1) + settings.max_wait_for_model + 30


async def _warm_up(client: sdclient.SDClient) -> None:
    """Send one tiny request so that a cold model starts loading before the first visitor."""
    try:
        await client.generate("warm-up", width=64, height=64, num_inference_steps=1, seed=0)
        logger.info("warm-up done", extra={"model_state": client.status.state})
    except sdclient.SDClientError as exc:
        logger.warning("warm-up failed: %s", type(exc).__name__, extra={"model_state": client.status.state})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdclient")
    except PackageNotFoundError:
        return "0"
