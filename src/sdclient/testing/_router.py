"""`FakeRouter`: a local stand-in for Hugging Face's router, the Hub's provider mapping and the
providers' image hosts, with failure modes on purpose.

One server answers as `router.huggingface.co` (`/{provider}/...` routes) and as the Hub
(`GET /api/models/{id}`); a second one, on another port, serves the images providers point at
(a host that is not Hugging Face's: no token may go there). Request and answer shapes follow
huggingface_hub 2.x `inference/_providers/`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

from ._http import HttpError, HttpRequest, read_request, response_head
from ._images import render

__all__ = ["FakeRouter", "JobScript", "RoutedRequest"]

_START_TIMEOUT = 10.0
_HOLD = "x-fake-hold-s"  # internal: seconds to hold the answer (a synchronous route's job time)
_MAX_HOLD = 3600.0

Provider = Literal["hf-inference", "fal-ai", "replicate", "wavespeed", "together", "nscale"]


@dataclass(frozen=True)
class JobScript:
    """How the fake plays one job at a provider (the next one submitted).

    Args:
        queue_s: Seconds the job waits in the provider's queue (``math.inf``: stuck there).
        run_s: Seconds it then runs.
        fail: The job fails with this message (for the base64 providers: a 500 answer).
        image_status: Status of the image URL (404: the URL was never written).
        poll_429: The first this many status requests answer 429 (``Retry-After: 0``).
        position: Queue position reported while queued (default: one per second of queue left).
    """

    queue_s: float = 0.0
    run_s: float = 0.0
    fail: str | None = None
    image_status: int = 200
    poll_429: int = 0
    position: int | None = None


@dataclass(frozen=True)
class RoutedRequest:
    """One request the fake received."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    """Lower-cased names."""
    json: Any
    """The decoded body (``None`` when empty or not JSON)."""
    host: Literal["router", "images"]
    """Which server: the router/Hub, or the image host."""

    @property
    def authorization(self) -> str | None:
        """The ``Authorization`` header sent."""
        return self.headers.get("authorization")


@dataclass
class _Job:
    id: str
    provider: str
    provider_model: str
    prompt: str
    parameters: dict[str, Any]
    script: JobScript
    created: float
    polls: int = 0
    cancelled: bool = False
    image_path: str = ""


@dataclass
class _Model:
    pipeline_tag: str
    tags: list[str]
    mapping: dict[str, dict[str, Any]] = field(default_factory=dict)


class FakeRouter:
    """A real HTTP server on 127.0.0.1 answering like the router, the Hub and the providers.

    Example:
        ```python
        with FakeRouter() as router:
            router.add_model("user/flux-lora", "fal-ai", "fal-ai/flux-lora", lora="lora.safetensors")
            router.script("fal-ai", JobScript(queue_s=2))
            client = SDClient("user/flux-lora", token="hf_x", router_url=router.url, hub_url=router.url)
        ```

    Routes (``{p}`` a provider model id, which may hold slashes):

    * Hub: ``GET /api/models/{id}`` (``pipeline_tag``, ``tags``, ``inferenceProviderMapping``).
    * hf-inference: ``POST /hf-inference/models/{id}``: the image.
    * fal-ai: ``POST /fal-ai/{p}`` (``{"images": [{"url"}]}``, answered once the job's queue and
      run time have passed, in real seconds, like ``fal.run``); with ``?_subdomain=queue``: the
      queue (``request_id``, ``response_url``), ``GET .../requests/{id}/status``,
      ``GET .../requests/{id}``, ``PUT .../requests/{id}/cancel``.
    * replicate: ``POST /replicate/v1/models/{p}/predictions`` or ``/replicate/v1/predictions``
      (``Prefer: wait``), ``GET /replicate/v1/predictions/{id}``, ``POST .../{id}/cancel``.
    * wavespeed: ``POST /wavespeed/api/v3/{p}``, ``GET /wavespeed/api/v3/predictions/{id}/result``
      (also without the ``/wavespeed`` prefix, as huggingface_hub asks any router that is not
      ``router.huggingface.co``).
    * together, nscale: ``POST /{provider}/v1/images/generations``: base64.
    * images: ``GET /images/{job}.png`` on :attr:`images_url`.

    Args:
        clock: Monotonic clock the queue times run on (tests pass a fake one).
        image_size: Side of the images when the request gives no size.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, image_size: int = 64) -> None:
        self.clock = clock
        self.image_size = image_size
        self._lock = threading.Lock()
        self._models: dict[str, _Model] = {}
        self._scripts: dict[str, deque[JobScript]] = {}
        self._jobs: dict[str, _Job] = {}
        self._requests: list[RoutedRequest] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.Server] = []
        self._ports: list[int] = []
        self._error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Start both servers in a background thread.

        Raises:
            RuntimeError: Already running, or the servers did not start.
        """
        if self._thread is not None:
            raise RuntimeError("FakeRouter is already running")
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="sdclient-fake-router", daemon=True
        )
        self._thread.start()
        if not ready.wait(_START_TIMEOUT) or self._error is not None:
            raise RuntimeError(f"FakeRouter did not start: {self._error}")
        return self

    def stop(self) -> None:
        """Stop serving (safe to call twice)."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_START_TIMEOUT)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            hosts: tuple[Literal["router", "images"], ...] = ("router", "images")
            for host in hosts:
                server = loop.run_until_complete(
                    asyncio.start_server(
                        functools.partial(self._serve, host=host), "127.0.0.1", 0, backlog=512
                    )
                )
                self._servers.append(server)
                self._ports.append(server.sockets[0].getsockname()[1])
        except BaseException as exc:
            self._error = exc
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            for server in self._servers:
                server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
            self._loop = None
            self._servers.clear()
            self._ports.clear()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The router's (and the Hub's) base URL, e.g. ``http://127.0.0.1:54321``."""
        if not self._ports:
            raise RuntimeError("FakeRouter is not running: use `with FakeRouter() as router:`")
        return f"http://127.0.0.1:{self._ports[0]}"

    @property
    def images_url(self) -> str:
        """The image host's base URL (another port: not a Hugging Face host)."""
        if not self._ports:
            raise RuntimeError("FakeRouter is not running: use `with FakeRouter() as router:`")
        return f"http://127.0.0.1:{self._ports[1]}"

    # -- set-up ------------------------------------------------------------------------------

    def add_model(
        self,
        model_id: str,
        provider: Provider,
        provider_id: str | None = None,
        *,
        lora: str | None = None,
        status: Literal["live", "staging", "error"] = "live",
        pipeline_tag: str = "text-to-image",
    ) -> None:
        """List a provider for a model in the Hub's ``inferenceProviderMapping`` (call again for
        more providers; the first added is listed first).

        Args:
            model_id: The Hub model id.
            provider: The provider.
            provider_id: The model's id at the provider (default: ``model_id``).
            lora: A LoRA adapter's weights file in the repo (``adapter: "lora"``).
            status: The mapping's status.
            pipeline_tag: The model's pipeline tag.
        """
        entry: dict[str, Any] = {
            "status": status,
            "providerId": provider_id or model_id,
            "task": "text-to-image",
        }
        if lora is not None:
            entry.update(adapter="lora", adapterWeightsPath=lora)
        with self._lock:
            model = self._models.setdefault(model_id, _Model(pipeline_tag, ["diffusers", "text-to-image"]))
            if lora is not None and "lora" not in model.tags:
                model.tags.append("lora")
            model.mapping[provider] = entry

    def script(self, provider: Provider, *jobs: JobScript) -> None:
        """Queue how the next jobs at ``provider`` play (else: done at once)."""
        with self._lock:
            self._scripts.setdefault(provider, deque()).extend(jobs)

    # -- records -----------------------------------------------------------------------------

    @property
    def requests(self) -> list[RoutedRequest]:
        """Every request received, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the records (models, scripts and jobs are kept)."""
        with self._lock:
            self._requests.clear()

    def job(self, job_id: str) -> dict[str, Any]:
        """What the fake knows of a job: ``{"polls", "cancelled", "provider"}``."""
        with self._lock:
            job = self._jobs[job_id]
            return {"polls": job.polls, "cancelled": job.cancelled, "provider": job.provider}

    @property
    def jobs(self) -> list[str]:
        """Ids of the jobs submitted, oldest first."""
        with self._lock:
            return list(self._jobs)

    @contextlib.contextmanager
    def patch_huggingface_hub(self) -> Iterator[None]:
        """Point huggingface_hub's ``InferenceClient`` and ``HfApi`` at this fake (the router base,
        the Hub endpoint and the LoRA URL template), for the duration of the block.

        ``HF_HUB_OFFLINE`` is left alone: huggingface_hub sends its requests to the fake.
        """
        from huggingface_hub import constants
        from huggingface_hub.inference._providers import PROVIDERS, _common

        helper = PROVIDERS["hf-inference"]["text-to-image"]
        saved = (
            constants.INFERENCE_PROXY_TEMPLATE,
            constants.ENDPOINT,
            constants.HUGGINGFACE_CO_URL_TEMPLATE,
            helper.base_url,
        )
        constants.INFERENCE_PROXY_TEMPLATE = self.url + "/{provider}"
        constants.ENDPOINT = self.url
        constants.HUGGINGFACE_CO_URL_TEMPLATE = self.url + "/{repo_id}/resolve/{revision}/{filename}"
        helper.base_url = f"{self.url}/hf-inference"
        _common._fetch_inference_provider_mapping.cache_clear()
        try:
            yield
        finally:
            (
                constants.INFERENCE_PROXY_TEMPLATE,
                constants.ENDPOINT,
                constants.HUGGINGFACE_CO_URL_TEMPLATE,
                helper.base_url,
            ) = saved
            _common._fetch_inference_provider_mapping.cache_clear()

    # -- serving -----------------------------------------------------------------------------

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: Literal["router", "images"]
    ) -> None:
        try:
            while True:
                try:
                    request = await read_request(reader, writer)
                except HttpError as exc:
                    await self._write(writer, exc.status, {"error": exc.message}, keep_alive=False)
                    return
                if request is None:
                    return
                body = _loads(request.body)
                with self._lock:
                    self._requests.append(
                        RoutedRequest(
                            request.method, request.path, request.query, request.headers, body, host
                        )
                    )
                if host == "images":
                    status, payload, content_type, headers = self._image(request)
                else:
                    status, payload, content_type, headers = self._route(request, body)
                hold = float((headers or {}).pop(_HOLD, 0.0))
                if hold > 0:
                    await asyncio.sleep(hold)
                keep = request.keep_alive
                await self._write(
                    writer, status, payload, content_type=content_type, headers=headers, keep_alive=keep
                )
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            if not writer.transport.is_closing():
                writer.close()

    async def _write(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        payload: Any,
        *,
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
        keep_alive: bool,
    ) -> None:
        if isinstance(payload, bytes):
            data = payload
        else:
            data = json.dumps(payload).encode()
            content_type = content_type or "application/json"
        headers = {"x-request-id": uuid.uuid4().hex, **(headers or {})}
        writer.write(response_head(status, content_type, len(data), headers, keep_alive=keep_alive) + data)
        await writer.drain()

    _Answer = tuple[int, Any, str | None, dict[str, str] | None]

    def _image(self, request: HttpRequest) -> _Answer:
        job_id = request.path.removeprefix("/images/").removesuffix(".png")
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or request.method != "GET":
            return 404, {"error": f"no image at {request.path}"}, None, None
        if job.script.image_status != 200:
            return job.script.image_status, {"error": "image not found"}, None, None
        return 200, self._render(job), "image/png", None

    def _render(self, job: _Job) -> bytes:
        params = job.parameters
        size: dict[str, Any] = params["image_size"] if isinstance(params.get("image_size"), dict) else {}
        width = params.get("width") or size.get("width") or self.image_size
        height = params.get("height") or size.get("height") or self.image_size
        if isinstance(params.get("size"), str) and "x" in params["size"]:
            width, height = (int(v) for v in params["size"].split("x", 1))
        return render("png", int(width), int(height), job.prompt, params.get("seed"))

    def _route(self, request: HttpRequest, body: Any) -> _Answer:
        path, method = request.path, request.method
        if method == "GET" and path.startswith("/api/models/"):
            return self._model_info(path.removeprefix("/api/models/"))
        provider, _, rest = path.lstrip("/").partition("/")
        rest = "/" + rest
        if provider == "api" and rest.startswith("/v3/predictions/"):  # huggingface_hub off-router form
            provider, rest = "wavespeed", "/api" + rest
        try:
            if provider == "hf-inference" and method == "POST" and rest.startswith("/models/"):
                return self._hf_inference(rest.removeprefix("/models/"), body)
            if provider == "fal-ai":
                return self._fal(method, rest, request.query, body)
            if provider == "replicate":
                return self._replicate(method, rest, request.headers, body)
            if provider == "wavespeed":
                return self._wavespeed(method, rest, body)
            if provider in ("together", "nscale") and method == "POST" and rest == "/v1/images/generations":
                return self._base64(provider, body)
        except _BadRequest as exc:
            return 422, {"error": str(exc)}, None, None
        return 404, {"error": f"Not Found: {method} {path}"}, None, None

    # -- the Hub -----------------------------------------------------------------------------

    def _model_info(self, model_id: str) -> _Answer:
        with self._lock:
            model = self._models.get(model_id)
        if model is None:
            return 404, {"error": "Repository Not Found"}, None, {"x-error-code": "RepoNotFound"}
        return (
            200,
            {
                "_id": uuid.uuid5(uuid.NAMESPACE_URL, model_id).hex,
                "id": model_id,
                "modelId": model_id,
                "private": False,
                "pipeline_tag": model.pipeline_tag,
                "library_name": "diffusers",
                "tags": list(model.tags),
                "inferenceProviderMapping": dict(model.mapping),
            },
            None,
            None,
        )

    # -- jobs --------------------------------------------------------------------------------

    def _submit(self, provider: str, provider_model: str, prompt: Any, parameters: dict[str, Any]) -> _Job:
        if not isinstance(prompt, str) or not prompt:
            raise _BadRequest("`prompt` must be a non-empty string")
        with self._lock:
            scripts = self._scripts.get(provider)
            script = scripts.popleft() if scripts else JobScript()
            job = _Job(uuid.uuid4().hex, provider, provider_model, prompt, parameters, script, self.clock())
            job.image_path = f"/images/{job.id}.png"
            self._jobs[job.id] = job
        return job

    def _state(self, job: _Job) -> tuple[Literal["queued", "running", "done", "failed", "cancelled"], int]:
        if job.cancelled:
            return "cancelled", 0
        elapsed = self.clock() - job.created
        script = job.script
        if elapsed < script.queue_s:
            left = script.queue_s - elapsed
            if script.position is not None:
                position = script.position
            else:  # one job ahead per second of queue left (a stuck job stays behind 10)
                position = 10 if math.isinf(left) else max(0, math.ceil(left) - 1)
            return "queued", position
        if elapsed < script.queue_s + script.run_s:
            return "running", 0
        return ("failed" if script.fail else "done"), 0

    def _job(self, job_id: str) -> _Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def _polled(self, job: _Job) -> bool:
        """Count a status request; `True` when it must answer 429."""
        with self._lock:
            job.polls += 1
            return job.polls <= job.script.poll_429

    def _image_url(self, job: _Job) -> str:
        return self.images_url + job.image_path

    def _hf_inference(self, model_id: str, body: Any) -> _Answer:
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
            return 400, {"error": 'send {"inputs": "<prompt>", "parameters": {...}}'}, None, None
        job = self._submit("hf-inference", model_id, body["inputs"], dict(body.get("parameters") or {}))
        if job.script.fail:
            return 500, {"error": job.script.fail}, None, None
        return 200, self._render(job), "image/png", {"x-compute-type": "cpu"}

    def _fal(self, method: str, rest: str, query: str, body: Any) -> _Answer:
        queue = "_subdomain=queue" in query
        if "/requests/" in rest:
            model, _, tail = rest.lstrip("/").partition("/requests/")
            job_id, _, action = tail.partition("/")
            job = self._job(job_id)
            if job is None:
                return 404, {"detail": f"Request {job_id} not found"}, None, None
            if method == "PUT" and action == "cancel":
                with self._lock:
                    job.cancelled = True
                return 202, {"status": "CANCELLATION_REQUESTED"}, None, None
            if method == "GET" and action == "status":
                if self._polled(job):
                    return 429, {"detail": "Too many requests"}, None, {"retry-after": "0"}
                state, position = self._state(job)
                if state == "queued":
                    return 202, {"status": "IN_QUEUE", "queue_position": position}, None, None
                if state == "running":
                    return 202, {"status": "IN_PROGRESS", "logs": []}, None, None
                answer: dict[str, Any] = {"status": "COMPLETED", "logs": []}
                if state in ("failed", "cancelled"):
                    answer["error"] = job.script.fail or "cancelled"
                return 200, answer, None, None
            if method == "GET" and action == "":
                state, _ = self._state(job)
                if state != "done":
                    return 400, {"detail": f"Request is {state}"}, None, None
                return 200, self._fal_result(job), None, None
            return 405, {"detail": "method not allowed"}, None, None
        if method != "POST" or not isinstance(body, dict):
            return 405, {"detail": "POST a JSON body"}, None, None
        model = rest.lstrip("/")
        job = self._submit(
            "fal-ai", model, body.get("prompt"), {k: v for k, v in body.items() if k != "prompt"}
        )
        if not queue:  # `fal.run` holds the request while the job waits and runs (real seconds)
            hold = {_HOLD: str(min(job.script.queue_s + job.script.run_s, _MAX_HOLD))}
            if job.script.fail:
                return 500, {"detail": job.script.fail}, None, hold
            return 200, self._fal_result(job), None, hold
        response_url = f"https://queue.fal.run/{model}/requests/{job.id}"
        return (
            200,
            {
                "request_id": job.id,
                "status": "IN_QUEUE",
                "response_url": response_url,
                "status_url": response_url + "/status",
                "cancel_url": response_url + "/cancel",
            },
            None,
            None,
        )

    def _fal_result(self, job: _Job) -> dict[str, Any]:
        return {
            "images": [{"url": self._image_url(job), "content_type": "image/png"}],
            "seed": job.parameters.get("seed"),
            "prompt": job.prompt,
        }

    def _replicate(self, method: str, rest: str, headers: dict[str, str], body: Any) -> _Answer:
        if rest.startswith("/v1/predictions/"):
            job_id, _, action = rest.removeprefix("/v1/predictions/").partition("/")
            job = self._job(job_id)
            if job is None:
                return 404, {"detail": "Not found."}, None, None
            if method == "POST" and action == "cancel":
                with self._lock:
                    job.cancelled = True
                return 200, self._prediction(job), None, None
            if method == "GET" and action == "":
                if self._polled(job):
                    return 429, {"detail": "Request was throttled."}, None, {"retry-after": "0"}
                return 200, self._prediction(job), None, None
            return 405, {"detail": "method not allowed"}, None, None
        if method != "POST" or not isinstance(body, dict) or not isinstance(body.get("input"), dict):
            return 422, {"detail": 'send {"input": {...}}'}, None, None
        if rest == "/v1/predictions":
            model = str(body.get("version", ""))
        elif rest.startswith("/v1/models/") and rest.endswith("/predictions"):
            model = rest.removeprefix("/v1/models/").removesuffix("/predictions")
        else:
            return 404, {"detail": "Not found."}, None, None
        inputs = dict(body["input"])
        job = self._submit("replicate", model, inputs.pop("prompt", None), inputs)
        return 201, self._prediction(job), None, None

    def _prediction(self, job: _Job) -> dict[str, Any]:
        state, _ = self._state(job)
        status = {
            "queued": "starting",
            "running": "processing",
            "done": "succeeded",
            "failed": "failed",
            "cancelled": "canceled",
        }[state]
        api = f"https://api.replicate.com/v1/predictions/{job.id}"
        return {
            "id": job.id,
            "model": job.provider_model,
            "status": status,
            "input": {"prompt": job.prompt, **job.parameters},
            "output": [self._image_url(job)] if state == "done" else None,
            "error": job.script.fail if state == "failed" else None,
            "urls": {"get": api, "cancel": api + "/cancel"},
        }

    def _wavespeed(self, method: str, rest: str, body: Any) -> _Answer:
        if rest.startswith("/api/v3/predictions/") and rest.endswith("/result"):
            job = self._job(rest.removeprefix("/api/v3/predictions/").removesuffix("/result"))
            if job is None or method != "GET":
                return 404, {"code": 404, "message": "not found"}, None, None
            if self._polled(job):
                return 429, {"code": 429, "message": "rate limited"}, None, {"retry-after": "0"}
            return 200, {"code": 200, "message": "success", "data": self._task(job)}, None, None
        if method != "POST" or not isinstance(body, dict) or not rest.startswith("/api/v3/"):
            return 404, {"code": 404, "message": "not found"}, None, None
        model = rest.removeprefix("/api/v3/")
        job = self._submit(
            "wavespeed", model, body.get("prompt"), {k: v for k, v in body.items() if k != "prompt"}
        )
        return 200, {"code": 200, "message": "success", "data": self._task(job)}, None, None

    def _task(self, job: _Job) -> dict[str, Any]:
        state, _ = self._state(job)
        status = {"queued": "created", "running": "processing", "done": "completed"}.get(state, "failed")
        return {
            "id": job.id,
            "model": job.provider_model,
            "status": status,
            "outputs": [self._image_url(job)] if state == "done" else [],
            "error": (job.script.fail or "") if state == "failed" else "",
            "urls": {"get": f"https://api.wavespeed.ai/api/v3/predictions/{job.id}/result"},
        }

    def _base64(self, provider: str, body: Any) -> _Answer:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return 422, {"error": {"message": "send a JSON body with `model` and `prompt`"}}, None, None
        job = self._submit(
            provider,
            body["model"],
            body.get("prompt"),
            {k: v for k, v in body.items() if k not in ("prompt", "model", "response_format")},
        )
        if job.script.fail:
            return 500, {"error": {"message": job.script.fail}}, None, None
        image = base64.b64encode(self._render(job)).decode()
        return (
            200,
            {"id": job.id, "model": body["model"], "data": [{"index": 0, "b64_json": image}]},
            None,
            None,
        )


class _BadRequest(ValueError):
    pass


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except (UnicodeDecodeError, ValueError):
        return None
