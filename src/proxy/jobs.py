"""Jobs: a generation that outlives the request that asked for it.

`POST /v1/jobs` answers `{id, status}` at once and the instance that took it runs the generation
in the background (through the same cache, coalescing and queue as `/generate`). The job's record,
its event log and its image live in the store for `SDPROXY_JOB_TTL_S`, so with Redis any instance
answers `GET /v1/jobs/{id}`, its events and its image, and `DELETE` from any instance cancels it.

A job is charged like `/generate`: one image of the caller's quota is held when it is created and
counted when it succeeds, given back when it fails or is canceled. A repeated `POST` with the same
`Idempotency-Key` (and the same body) returns the first job and charges nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from .errors import Conflict, InvalidInput, NotFound, ProxyError, error_body
from .limits import ClientLimiter
from .schemas import ErrorDetail, JobBody, JobStatus
from .service import GenerationResult, GenerationService
from .store import Admitted, Store
from .webhooks import WebhookSender, check_target

__all__ = ["TERMINAL", "JobManager", "JobRecord"]

logger = logging.getLogger("proxy.jobs")

TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})

FOLLOW_POLL_S = 1.0
"""Readers of a job's events re-read its log at least this often."""

IDEMPOTENCY_WAIT_S = 2.0
"""How long a repeated request waits for the first one's job record to appear."""


def _canceled_error() -> ProxyError:
    error = ProxyError("The job was canceled.")
    error.code = "canceled"
    return error


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(18)  # 144 random bits


class JobRecord(BaseModel):
    """A job as the store keeps it (`JobView` is what callers see)."""

    id: str
    owner: str
    status: JobStatus = "queued"
    position: int | None = None
    eta_s: float | None = None
    seed: int | None = None
    image_id: str | None = None
    error: ErrorDetail | None = None
    webhook_url: str | None = None
    request_id: str | None = None
    base_url: str = ""
    """The proxy's URL as the creator called it (for the webhook's `result_url`)."""
    created_at: float
    finished_at: float | None = None


class JobManager:
    """Creates, runs, reads and cancels jobs.

    Args:
        store: Where records, event logs and images are kept.
        service: What generates the images.
        limiter: Charges jobs against the caller's quota.
        ttl_s: How long jobs and images are kept.
        webhooks: Sends the signed webhooks; None when no secret is configured.
    """

    def __init__(
        self,
        store: Store,
        service: GenerationService,
        limiter: ClientLimiter,
        *,
        ttl_s: float,
        webhooks: WebhookSender | None,
    ) -> None:
        self.store = store
        self.service = service
        self.limiter = limiter
        self.ttl_s = ttl_s
        self.webhooks = webhooks
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        """Jobs this instance is running (canceled ones until they have wound down)."""
        return len(self._tasks)

    # -- creating ---------------------------------------------------------------------------------

    async def create(
        self,
        owner: str,
        body: JobBody,
        *,
        idempotency_key: str | None,
        request_id: str | None,
        base_url: str = "",
    ) -> tuple[JobRecord, bool]:
        """Create a job and start it, or find the one an earlier request with the same key made.

        Returns:
            The job, and whether it was created now.

        Raises:
            InvalidInput: The webhook URL is refused.
            Conflict: The key was used with another body, or its first request is still running.
            RateLimitExceeded, QuotaExceeded, StoreUnavailable: From the admission.
        """
        if body.webhook_url is not None:
            if self.webhooks is None:
                raise InvalidInput(
                    "webhook_url: webhooks are off on this proxy (the operator enables them by "
                    "setting SDPROXY_WEBHOOK_SECRET); poll GET /v1/jobs/{id} or read its events instead"
                )
            await check_target(body.webhook_url, allow_private=self.webhooks.allow_private)
        record = JobRecord(
            id=_new_id("job_"),
            owner=owner,
            webhook_url=body.webhook_url,
            request_id=request_id,
            base_url=base_url.rstrip("/"),
            created_at=time.time(),
        )
        idem_key = None
        if idempotency_key is not None:
            fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
            digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
            idem_key = f"idem:{owner}:{digest}"
            claim = json.dumps({"job": record.id, "fingerprint": fingerprint}).encode()
            earlier = await self.store.put_new(idem_key, claim, ttl_s=self.ttl_s)
            if earlier is not None:
                return await self._earlier(owner, json.loads(earlier), fingerprint), False
        try:
            held = await self.limiter.admit(owner)
        except ProxyError:
            if idem_key is not None:
                await self.store.delete(idem_key)  # refused: the key may be used again
            raise
        try:
            await self._save(record)
        except ProxyError:  # the store went away: no job, so nothing held and the key is free
            await self.limiter.release(held)
            if idem_key is not None:
                with contextlib.suppress(ProxyError):
                    await self.store.delete(idem_key)
            raise
        task = asyncio.create_task(self._run(record, body, held), name=f"sdproxy-{record.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record, True

    async def _earlier(self, owner: str, claim: dict[str, Any], fingerprint: str) -> JobRecord:
        if claim["fingerprint"] != fingerprint:
            raise Conflict(
                "This Idempotency-Key was already used with a different body: "
                "use a new key for a new request."
            )
        deadline = time.monotonic() + IDEMPOTENCY_WAIT_S
        while (record := await self._load(claim["job"])) is None:
            if time.monotonic() > deadline:
                raise Conflict("A request with this Idempotency-Key is still being processed: retry shortly.")
            await asyncio.sleep(0.05)
        if record.owner != owner:
            raise NotFound("No such job.")
        return record

    # -- running ----------------------------------------------------------------------------------

    async def _run(self, record: JobRecord, body: JobBody, held: Admitted) -> None:
        events: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
        generation = asyncio.create_task(
            self.service.generate(body.generation(), listener=lambda n, d: events.put_nowait((n, d)))
        )
        generation.add_done_callback(lambda _: events.put_nowait(None))
        watcher = asyncio.create_task(self._watch_cancel(record.id, generation))
        try:
            while (event := await events.get()) is not None:
                await self._progress(record, *event)
            await self._settle(record, generation, held)
        except asyncio.CancelledError:  # the proxy is stopping
            generation.cancel()
            await self._finish(
                record, "failed", error=ProxyError("The proxy stopped before the job finished.")
            )
            await self.limiter.release(held)
            raise
        except ProxyError as exc:  # the store went away while the job ran
            logger.warning("job %s lost its store: %s", record.id, exc.code)
            await self.limiter.release(held)
        finally:
            watcher.cancel()
        if self.webhooks is not None and record.webhook_url is not None and record.status in TERMINAL:
            await self.webhooks.deliver(record.webhook_url, record.id, self.webhook_payload(record))

    async def _canceled(self, job_id: str) -> bool:
        """Whether the job was canceled, by any instance (a marker apart from the record, which
        this instance keeps rewriting while the job runs)."""
        return await self.store.get(f"jobcanceled:{job_id}") is not None

    async def _progress(self, record: JobRecord, name: str, data: dict[str, Any]) -> None:
        if await self._canceled(record.id):
            return  # the canceled record stays as it is; the generation is being stopped
        if name == "queued":
            record.position = data["position"]
        elif name == "loading":
            record.status, record.eta_s, record.position = "running", data["eta_s"], None
        elif name == "generating":
            record.status, record.eta_s, record.position = "running", None, None
        await self._save(record)
        await self._log(record.id, name, data)

    async def _settle(
        self, record: JobRecord, generation: asyncio.Task[tuple[GenerationResult, str]], held: Admitted
    ) -> None:
        if generation.cancelled() or await self._canceled(record.id):
            await self.limiter.release(held)  # not charged
            # Written again: a progress update may have overwritten the canceled record.
            self._mark_canceled(record)
            await self._save(record)
            return
        exc = generation.exception()
        if exc is not None:
            await self.limiter.release(held)
            error = exc if isinstance(exc, ProxyError) else ProxyError("Internal error.")
            if not isinstance(exc, ProxyError):
                logger.error("job %s failed unexpectedly", record.id, exc_info=exc)
            await self.limiter.count(record.owner, "errors")
            await self._finish(record, "failed", error=error)
            return
        result, _ = generation.result()
        record.image_id = await self.save_image(record.owner, result)
        record.seed = result.seed
        await self.limiter.deliver(held)
        await self._finish(record, "succeeded")

    async def _finish(self, record: JobRecord, status: JobStatus, *, error: ProxyError | None = None) -> None:
        record.status, record.finished_at, record.position, record.eta_s = status, time.time(), None, None
        if error is not None:
            record.error = ErrorDetail.model_validate(error_body(error)["error"])
            await self._save(record)
            await self._log(record.id, "error", error_body(error))
        else:
            await self._save(record)
            await self._log(record.id, "image", {"image_id": record.image_id})

    async def _watch_cancel(self, job_id: str, generation: asyncio.Task[Any]) -> None:
        """Cancel `generation` once the job is canceled, by any instance."""
        async with self.store.watch(f"jobcancel:{job_id}") as watch:
            while not generation.done():
                await watch.wait(FOLLOW_POLL_S)
                try:
                    canceled = await self._canceled(job_id) or await self._load(job_id) is None
                except ProxyError:
                    continue
                if canceled:
                    generation.cancel()
                    return

    # -- reading and canceling --------------------------------------------------------------------

    async def get(self, owner: str, job_id: str) -> JobRecord:
        """The job, if it exists and `owner` made it.

        Raises:
            NotFound: No such job for this caller (another caller's job looks the same).
        """
        record = await self._load(job_id) if job_id.startswith("job_") else None
        if record is None or record.owner != owner:
            raise NotFound(
                "No such job (jobs are kept for a limited time, and only their creator reads them)."
            )
        return record

    async def events(self, owner: str, job_id: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The job's events from its start, then new ones, until `image` or `error`."""
        await self.get(owner, job_id)
        log = f"jobevents:{job_id}"
        seen = 0
        async with self.store.watch(log) as watch:
            while True:
                for item in await self.store.read(log, seen):
                    seen += 1
                    event = json.loads(item)
                    yield event["event"], event["data"]
                    if event["event"] in ("image", "error"):
                        return
                if not await watch.wait(FOLLOW_POLL_S) and await self._load(job_id) is None:
                    return

    async def cancel(self, owner: str, job_id: str) -> JobRecord | None:
        """Cancel a job that has not finished; delete a finished one and its image.

        Returns:
            The canceled job, or None when a finished job was deleted.

        Raises:
            NotFound: No such job for this caller.
        """
        record = await self.get(owner, job_id)
        if record.status in TERMINAL:
            keys = [f"job:{job_id}", f"jobevents:{job_id}", f"jobcanceled:{job_id}"]
            if record.image_id is not None:
                keys.append(f"image:{record.image_id}")
            await self.store.delete(*keys)
            return None
        await self.store.put(f"jobcanceled:{job_id}", b"1", ttl_s=self.ttl_s)
        self._mark_canceled(record)
        await self._save(record)
        await self._log(job_id, "error", error_body(_canceled_error()))
        await self.store.notify(f"jobcancel:{job_id}")
        return record

    @staticmethod
    def _mark_canceled(record: JobRecord) -> None:
        record.status, record.position, record.eta_s = "canceled", None, None
        record.finished_at = record.finished_at or time.time()
        record.error = ErrorDetail.model_validate(error_body(_canceled_error())["error"])

    # -- images -----------------------------------------------------------------------------------

    async def save_image(self, owner: str, result: GenerationResult) -> str:
        """Keep an image for `owner` for the jobs' TTL; returns its id."""
        image_id = _new_id("img_")
        await self.store.put(
            f"image:{image_id}", owner.encode() + b"\n" + result.to_bytes(), ttl_s=self.ttl_s
        )
        return image_id

    async def image(self, owner: str, image_id: str) -> GenerationResult:
        """An image kept for `owner`.

        Raises:
            NotFound: No such image for this caller.
        """
        blob = await self.store.get(f"image:{image_id}") if image_id.startswith("img_") else None
        if blob is not None:
            stored_owner, _, data = blob.partition(b"\n")
            if stored_owner.decode() == owner:
                return GenerationResult.from_bytes(data)
        raise NotFound("No such image (images are kept for a limited time, and only for their creator).")

    # -- helpers ----------------------------------------------------------------------------------

    def webhook_payload(self, record: JobRecord) -> dict[str, Any]:
        """What a webhook receiver gets: the job's public view (the image is fetched by URL)."""
        return {
            "id": record.id,
            "status": record.status,
            "seed": record.seed,
            "result_url": None
            if record.image_id is None
            else f"{record.base_url}/v1/images/{record.image_id}",
            "error": None if record.error is None else record.error.model_dump(exclude_none=True),
            "created_at": record.created_at,
            "finished_at": record.finished_at,
        }

    async def _save(self, record: JobRecord) -> None:
        await self.store.put(f"job:{record.id}", record.model_dump_json().encode(), ttl_s=self.ttl_s)

    async def _load(self, job_id: str) -> JobRecord | None:
        blob = await self.store.get(f"job:{job_id}")
        return None if blob is None else JobRecord.model_validate_json(blob)

    async def _log(self, job_id: str, name: str, data: dict[str, Any]) -> None:
        item = json.dumps({"event": name, "data": data}).encode()
        await self.store.append(f"jobevents:{job_id}", item, ttl_s=self.ttl_s)

    async def aclose(self) -> None:
        """Stop the jobs this instance runs (they end `failed`) and the webhook client."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.webhooks is not None:
            await self.webhooks.aclose()
