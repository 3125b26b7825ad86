"""``sdtrain serve``: a local server that answers the text-to-image protocol for one pipeline.

It speaks what ``SDClient``, ``huggingface_hub.InferenceClient`` and the proxy expect
(the Hugging Face Inference API's text-to-image task): ``POST /models/{model_id}`` (or ``POST /``) with
``{"inputs": prompt, "parameters": {...}}`` answers the image bytes. While the pipeline loads (in a
background thread, so the server answers at once) requests get
``503 {"error": "Model <id> is currently loading", "estimated_time": <s>}``.

Requests are queued for the one pipeline: a single worker thread generates, one image at a time,
so the event loop stays free to answer ``/health`` and 503s; beyond ``max_queue`` waiting requests
the server answers ``503 overloaded`` with ``Retry-After``. Prompts are never logged, only their
length.

One request cannot wedge the server (:class:`ServeLimits`): a request over the cost budget
(width x height x steps, by default the model's own resolution at 100 steps), with a prompt or a
body over their limits gets a 422 (413 for the body) naming the limit; a generation stops between
denoising steps when its client has gone, when it runs past ``request_timeout_s`` or when the server
is told to stop (SIGTERM/SIGINT answer within a step); and a request identical to one already
queued or running (same seed and parameters: a client's retry) joins it instead of queueing
another copy.

```python
from trainer.serve import serve

serve("runs/me/model", model_id="me/sd-me", port=7860)  # blocks; Ctrl+C stops
```
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import math
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ConfigDict, Field

from sdclient.protocol import (
    HUB_ID,
    INVALID_PARAMETERS_STATUS,
    Header,
    ImageSide,
    InvalidBody,
    Steps,
    TextToImageInputs,
    TextToImageParameters,
    error_body,
    header_is_true,
    is_loopback,
    loading_body,
    parse_text_to_image,
)

if TYPE_CHECKING:
    from types import FrameType

    import torch
    from PIL.Image import Image

__all__ = [
    "DEFAULT_MAX_QUEUE",
    "GenerationParameters",
    "ModelServer",
    "ServeLimits",
    "TextToImageRequest",
    "create_app",
    "default_model_id",
    "serve",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 8
MAX_SIDE = 2048
MAX_STEPS = 500
BUDGET_STEPS = 100
"""The default cost budget: the model's own resolution at this many steps."""
_DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
# Loading estimate: start-up (importing torch/diffusers is most of it when not done yet) + reading
# the weights.
_LOAD_OVERHEAD_S = 2.0
_IMPORT_S = 10.0
_LOAD_BYTES_PER_S = 150e6
_UNKNOWN_LOAD_S = 60.0  # a Hub id that may have to be downloaded first
_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
_CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


Side = Annotated[ImageSide | None, Field(ge=8, le=MAX_SIDE, multiple_of=8)]


class GenerationParameters(TextToImageParameters):
    """The ``parameters`` of a request (the protocol's, narrowed to what one local GPU serves, plus
    ``lora_scale``); unset ones take the pipeline's defaults. Unknown names are refused."""

    model_config = ConfigDict(extra="forbid")

    width: Side = None
    height: Side = None
    num_inference_steps: Annotated[Steps | None, Field(le=MAX_STEPS)] = None
    lora_scale: float | None = Field(default=None, ge=0, le=4, strict=True)
    """Strength of a LoRA adapter (0: the base model, 1: as trained); only for a LoRA model."""


class TextToImageRequest(TextToImageInputs):
    """The JSON body: ``inputs`` (the prompt), ``parameters`` and the legacy ``options``."""

    parameters: GenerationParameters = Field(default_factory=GenerationParameters)


def default_model_id(model: Path | str) -> str:
    """The id served when none is given: a Hub id as is, else the run's or folder's or file's name.

    ``runs/me/model`` -> ``me``; ``runs/me/export/model.safetensors`` -> ``me``;
    ``sd-me.safetensors`` -> ``sd-me``.
    """
    path = Path(model)
    if not path.exists() and str(model).count("/") == 1:
        return str(model)
    path = path.resolve()
    name = path.stem if path.is_file() else path.name
    if path.is_file() and path.parent.name == "export":
        name = path.parent.parent.name
    elif name == "model":
        name = path.parent.name
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "model"


def _weights_size(model: Path | str) -> int | None:
    path = Path(model)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(
            f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin")
        )
    return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_sha(folder: Path) -> str:
    """SHA-256 over a diffusers folder's model_index.json and each weight file's name, size, first and
    last MiB: two trainings of one base differ in their weights, which a hash of the index would miss,
    and hashing gigabytes of weights would delay start-up."""
    digest = hashlib.sha256((folder / "model_index.json").read_bytes())
    suffixes = (".safetensors", ".bin")
    weight_files = sorted(f for f in folder.rglob("*") if f.suffix in suffixes and f.is_file())
    for weights in weight_files:
        size = weights.stat().st_size
        digest.update(f"{weights.relative_to(folder).as_posix()}\0{size}\0".encode())
        with weights.open("rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(size - (1 << 20), 0))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()


def _model_sha(model: Path | str, pipe: Any) -> str:
    """``x-sha``: a Hub snapshot's commit, else the SHA-256 of the single file, else a digest of the
    folder's index and weights (``folder_sha``)."""
    path = Path(model)
    if path.is_file():
        return _sha256_file(path)
    source = path if path.is_dir() else Path(str(getattr(pipe.config, "_name_or_path", "") or "."))
    if source.parent.name == "snapshots":
        return source.name
    return folder_sha(source) if (source / "model_index.json").is_file() else "unknown"


def _compute_type(device: torch.device) -> str:
    if device.type == "cuda":
        import torch

        return str(torch.cuda.get_device_name(device))
    return device.type


def _pick_format(accept: str | None) -> str:
    """The image format for an ``Accept`` header: the supported type with the highest q, else PNG."""
    best, best_q = "PNG", -1.0
    for item in (accept or "").split(","):
        media, _, params = item.strip().lower().partition(";")
        q = 1.0
        match = re.search(r"q=([0-9.]+)", params)
        if match:
            with contextlib.suppress(ValueError):
                q = float(match[1])
        fmt = _FORMATS.get(media.strip()) or ("PNG" if media.strip() in ("image/*", "*/*") else None)
        if fmt and q > best_q and q > 0:
            best, best_q = fmt, q
    return best


@dataclass(frozen=True)
class ServeLimits:
    """What one request may cost (the operator's budget for a deployment).

    Args:
        max_megapixel_steps: Width x height x steps / 10^6 a request may ask for; ``None``: the
            model's own resolution at :data:`BUDGET_STEPS` steps (26.2 for SD 1.5's 512 px, 104.9
            for SDXL's 1024 px).
        max_prompt_chars: Longest prompt or negative prompt.
        max_body_bytes: Largest request body.
        request_timeout_s: A generation still running after this long is stopped (503).
    """

    max_megapixel_steps: float | None = None
    max_prompt_chars: int = 2000
    max_body_bytes: int = 64 * 1024
    request_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_megapixel_steps is not None and not self.max_megapixel_steps > 0:
            raise ValueError(f"max_megapixel_steps must be > 0, got {self.max_megapixel_steps}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0 seconds, got {self.request_timeout_s}")


class Stopped(Exception):
    """A generation stopped between two denoising steps; the message says why."""


@dataclass
class _Generated:
    data: bytes
    content_type: str
    seed: int
    compute_s: float


@dataclass
class _Job:
    """One generation, queued or running, and the requests waiting for it."""

    key: str | None
    deadline: float
    cancel: threading.Event = field(default_factory=threading.Event)
    waiters: int = 1
    future: asyncio.Future[_Generated] | None = None


@dataclass
class ModelServer:
    """One pipeline, its loading state and its single generation worker.

    Args:
        model: What :func:`trainer.loading.load_pipeline` takes (folder, single file, Hub id).
        model_id: The id answered at ``/models/{model_id}`` (at most one slash).
        config: For a single file: the diffusers folder describing its architecture.
        device: Where to run; default CUDA, MPS or the CPU.
        max_queue: Requests allowed to wait for the worker; more get 503 overloaded.
        loader: Builds the pipeline (default: ``load_pipeline(model, device=, config=, lora=)``).
        lora: A LoRA adapter loaded into ``model`` (a run's ``lora/`` folder or an adapter file).
        limits: What one request may cost.
        vae: A VAE used instead of the model's own (e.g. the fp16-safe one a LoRA run trained with).
    """

    model: Path | str
    model_id: str
    config: Path | None = None
    lora: Path | None = None
    vae: str | None = None
    device: str | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    loader: Callable[[], Any] | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)

    state: Literal["loading", "ready", "failed"] = "loading"
    error: str | None = None
    sha: str = "unknown"
    compute_type: str = "unknown"
    pipe: Any = None
    _estimate_s: float = 0.0
    _started: float = field(default_factory=time.monotonic)
    _pending: int = 0
    _avg_compute_s: float = 1.0
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
    )
    _scheduler: Any = None
    _loaded: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _native_side: int = 512
    _default_steps: int = 50
    _stopping: threading.Event = field(default_factory=threading.Event)
    _jobs: dict[str, _Job] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not HUB_ID.fullmatch(self.model_id):
            raise ValueError(
                f"Invalid model id {self.model_id!r}: use letters, digits, '-', '_', '.' "
                "and at most one '/' (e.g. me/sd-me)."
            )
        size = _weights_size(self.model)
        overhead = _LOAD_OVERHEAD_S + (0.0 if "diffusers" in sys.modules else _IMPORT_S)
        self._estimate_s = overhead + (_UNKNOWN_LOAD_S if size is None else size / _LOAD_BYTES_PER_S)

    # -- loading ---------------------------------------------------------------------------------

    def start_loading(self) -> threading.Thread:
        """Load the pipeline in a background thread (call from the event loop)."""
        self._loop = asyncio.get_running_loop()
        self._loaded = asyncio.Event()
        self._started = time.monotonic()
        thread = threading.Thread(target=self._load, name="load-pipeline", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        logger.info("Loading %s as %s (about %.0f s)", self.model, self.model_id, self._estimate_s)
        try:
            if self.loader is not None:
                pipe = self.loader()
            else:
                from trainer.loading import load_pipeline

                pipe = load_pipeline(
                    self.model,
                    device=self.device,
                    config=self.config,
                    local_files_only=self.config is not None,
                    lora=self.lora,
                    vae=self.vae,
                )
            self.sha = _model_sha(self.model, pipe)
            self.compute_type = _compute_type(pipe.device)
            self._scheduler = pipe.scheduler
            self._native_side, self._default_steps = _native_size(pipe)
            self.pipe = pipe
            self.state = "ready"
            logger.info(
                "Model %s ready on %s in %.1f s",
                self.model_id,
                self.compute_type,
                time.monotonic() - self._started,
            )
        except Exception as exc:  # any failure is reported to every request
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            logger.error("Loading %s failed: %s", self.model, self.error)
        finally:
            if self._loop is not None and self._loaded is not None:
                with contextlib.suppress(RuntimeError):  # the loop already closed (shutdown)
                    self._loop.call_soon_threadsafe(self._loaded.set)

    def estimated_time(self) -> float:
        """Seconds of loading left (at least 1 while loading)."""
        return round(max(self._estimate_s - (time.monotonic() - self._started), 1.0), 1)

    async def wait_loaded(self) -> None:
        """Wait until loading finished (ready or failed)."""
        if self._loaded is not None:
            await self._loaded.wait()

    def stop(self) -> None:
        """Stop: queued generations are dropped, the running one stops at its next step."""
        self._stopping.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    close = stop

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping.is_set()

    # -- limits ----------------------------------------------------------------------------------

    @property
    def max_megapixel_steps(self) -> float:
        """The cost budget of one request (width x height x steps / 10^6)."""
        if self.limits.max_megapixel_steps is not None:
            return self.limits.max_megapixel_steps
        return self._native_side**2 * BUDGET_STEPS / 1e6

    def over_budget(self, request: TextToImageRequest) -> str | None:
        """Why ``request`` is over this server's limits, or ``None``."""
        limit = self.limits.max_prompt_chars
        for name, text in (
            ("inputs", request.inputs),
            ("negative_prompt", request.parameters.negative_prompt),
        ):
            if text is not None and len(text) > limit:
                return (
                    f"`{name}` has {len(text)} characters, more than this server's {limit} "
                    "(sdtrain serve --max-prompt-chars); Stable Diffusion reads about 77 tokens anyway."
                )
        params = request.parameters
        width = params.width or self._native_side
        height = params.height or self._native_side
        steps = params.num_inference_steps or self._default_steps
        cost = width * height * steps / 1e6
        if cost > self.max_megapixel_steps:
            return (
                f"width x height x num_inference_steps = {width} x {height} x {steps} = {cost:.1f} "
                f"megapixel-steps, over this server's budget of {self.max_megapixel_steps:.1f} "
                "(sdtrain serve --max-megapixel-steps): ask for fewer steps or a smaller image."
            )
        return None

    # -- generation ------------------------------------------------------------------------------

    def scheduler_class(self, name: str) -> Any:
        """The diffusers scheduler class called ``name``, if it can replace the pipeline's.

        Raises:
            ValueError: unknown or incompatible name (the message lists the compatible ones).
        """
        import diffusers

        base = self._scheduler
        compatible = sorted({c.__name__ for c in base.compatibles} | {type(base).__name__})
        if name == type(base).__name__:
            return type(base)
        cls = getattr(diffusers, name, None)
        if name not in compatible or not isinstance(cls, type) or not hasattr(cls, "from_config"):
            raise ValueError(
                f"Unknown scheduler {name!r} (`scheduler` in `parameters`): "
                f"use one of {', '.join(compatible)}."
            )
        return cls

    @property
    def pending(self) -> int:
        """Requests queued or generating."""
        return self._pending

    def retry_after(self) -> int:
        """Seconds after which a rejected request may find room."""
        return max(1, math.ceil(self._avg_compute_s * max(self._pending - self.max_queue, 1)))

    async def generate(
        self,
        request: TextToImageRequest,
        fmt: str,
        scheduler: Any = None,
        client_gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> _Generated:
        """Queue ``request`` for the worker thread and wait for its image.

        A request identical to one queued or running (an explicit seed, the same parameters and
        format: a retry) waits for that one. When every request waiting for a generation has gone
        (``client_gone``), it is stopped.

        Args:
            request: The validated request.
            fmt: Pillow format name (``PNG``, ``JPEG``, ``WEBP``).
            scheduler: A class from :meth:`scheduler_class`, or None for the pipeline's own.
            client_gone: Tells whether the requesting client has disconnected.

        Raises:
            Stopped: The generation was stopped (timeout, shutdown, or every client gone).
        """
        key = None
        if request.parameters.seed is not None:
            key = hashlib.sha256(f"{request.model_dump_json()}|{fmt}|{scheduler}".encode()).hexdigest()
        job = self._jobs.get(key) if key is not None else None
        if job is not None and not job.cancel.is_set():
            job.waiters += 1
        else:
            job = self._start(key, request, scheduler, fmt)
        assert job.future is not None
        try:
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=_DISCONNECT_POLL_S)
                if done:
                    return job.future.result()
                if client_gone is not None and await client_gone():
                    raise Stopped("the client disconnected")
        finally:
            job.waiters -= 1
            if job.waiters == 0 and not job.future.done():
                job.cancel.set()  # nobody waits for it any more

    def _start(self, key: str | None, request: TextToImageRequest, scheduler: Any, fmt: str) -> _Job:
        job = _Job(key, deadline=time.monotonic() + self.limits.request_timeout_s)
        if key is not None:
            self._jobs[key] = job
        self._pending += 1
        loop = asyncio.get_running_loop()
        job.future = loop.run_in_executor(self._executor, self._generate, job, request, scheduler, fmt)

        def finished(future: asyncio.Future[_Generated]) -> None:
            self._pending -= 1
            if key is not None and self._jobs.get(key) is job:
                del self._jobs[key]
            if not future.cancelled() and future.exception() is None:
                self._avg_compute_s = 0.7 * self._avg_compute_s + 0.3 * future.result().compute_s

        job.future.add_done_callback(finished)
        return job

    def _check(self, job: _Job) -> None:
        """Raise :class:`Stopped` when ``job`` must not go on (called between denoising steps)."""
        if self._stopping.is_set():
            raise Stopped("the server is shutting down")
        if job.cancel.is_set():
            raise Stopped("every client waiting for it has gone")
        if time.monotonic() > job.deadline:
            raise Stopped(
                f"the generation took longer than this server's {self.limits.request_timeout_s:.0f} s "
                "(sdtrain serve --request-timeout)"
            )

    def _generate(self, job: _Job, request: TextToImageRequest, scheduler_cls: Any, fmt: str) -> _Generated:
        import torch

        self._check(job)  # its client may have left while it was queued

        params = request.parameters
        pipe = self.pipe
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        kwargs: dict[str, Any] = {
            k: v
            for k, v in params.model_dump(exclude={"seed", "scheduler", "lora_scale"}).items()
            if v is not None  # unset: the pipeline's own defaults
        }
        if params.lora_scale is not None:
            # UNet pipelines take the adapter's scale as cross-attention kwargs, FLUX as joint ones.
            attention = "joint_attention_kwargs" if hasattr(pipe, "transformer") else "cross_attention_kwargs"
            kwargs[attention] = {"scale": params.lora_scale}

        def between_steps(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            self._check(job)
            return tensors

        kwargs["callback_on_step_end"] = between_steps
        original = self._scheduler
        if scheduler_cls is not None and scheduler_cls is not type(original):
            pipe.scheduler = scheduler_cls.from_config(original.config)
        try:
            generator = torch.Generator(device=pipe.device).manual_seed(seed)
            start = time.perf_counter()
            with torch.inference_mode():
                image: Image = pipe(request.inputs, generator=generator, **kwargs).images[0]
            compute_s = time.perf_counter() - start
        finally:
            pipe.scheduler = original
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
        return _Generated(buffer.getvalue(), _CONTENT_TYPES[fmt], seed, compute_s)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or ``None`` when it is longer than ``limit`` bytes (read no further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _native_size(pipe: Any) -> tuple[int, int]:
    """The side a pipeline draws at by default and its default number of steps."""
    import inspect

    unet = getattr(pipe, "unet", None)
    # A UNet's latent size, or a transformer pipeline's (FLUX) default size in latent pixels.
    sample = getattr(getattr(unet, "config", None), "sample_size", getattr(pipe, "default_sample_size", None))
    scale = getattr(pipe, "vae_scale_factor", 8)
    side = int(sample * scale) if isinstance(sample, int) else 512
    try:
        steps = inspect.signature(pipe.__call__).parameters["num_inference_steps"].default
    except (KeyError, TypeError, ValueError):
        steps = 50
    return side, steps if isinstance(steps, int) else 50


def _error(status: int, message: str | list[str], headers: dict[str, str] | None = None) -> JSONResponse:
    """The protocol's error answer (:func:`sdclient.protocol.error_body`)."""
    return JSONResponse(error_body(message), status_code=status, headers=headers)


def create_app(
    model: Path | str,
    *,
    model_id: str | None = None,
    config: Path | None = None,
    device: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    loader: Callable[[], Any] | None = None,
    lora: Path | None = None,
    limits: ServeLimits | None = None,
    vae: str | None = None,
) -> FastAPI:
    """The ASGI app serving ``model``; it starts loading when the app starts (lifespan).

    Args:
        model: Diffusers folder, single ``.safetensors``/``.ckpt`` file or Hub id.
        model_id: Id answered at ``/models/{model_id}``; default :func:`default_model_id`.
        config: For a single file: the diffusers folder describing its architecture.
        device: ``cuda``, ``cpu``, ...; default the best available.
        max_queue: Requests that may wait for the pipeline; more get 503 with ``Retry-After``.
        loader: Replaces the default loader (``trainer.loading.load_pipeline``); it must return a
            text-to-image pipeline.
        lora: A LoRA adapter to load into ``model`` (requests may then set ``lora_scale``).
        limits: What one request may cost (default :class:`ServeLimits`).
        vae: A VAE to use instead of the model's own (folder or Hub id).

    Returns:
        A FastAPI app: ``POST /``, ``POST /models/{model_id}``, ``GET /health``.

    Raises:
        ValueError: an invalid ``model_id``.
    """
    server = ModelServer(
        model=model,
        model_id=model_id or default_model_id(model),
        config=Path(config) if config is not None else None,
        device=device,
        max_queue=max_queue,
        loader=loader,
        lora=lora,
        limits=limits or ServeLimits(),
        vae=vae,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.start_loading()
        yield
        server.close()

    app = FastAPI(
        title="sdtrain serve",
        summary="Text-to-image over the Hugging Face Inference API protocol.",
        lifespan=lifespan,
    )
    app.state.server = server

    async def answer(request: Request) -> Response:
        request_id = request.headers.get(Header.REQUEST_ID) or uuid.uuid4().hex
        body = await _read_body(request, server.limits.max_body_bytes)
        if body is None:
            return _error(
                413,
                f"The body is larger than this server's {server.limits.max_body_bytes} bytes "
                "(sdtrain serve --max-body-bytes).",
            )
        try:
            payload = parse_text_to_image(body, TextToImageRequest)
        except InvalidBody as exc:
            return _error(exc.status, exc.error)
        if payload.parameters.lora_scale is not None and server.lora is None:
            message = f"parameters.lora_scale: {server.model_id} is not a LoRA model; leave it out."
            return _error(INVALID_PARAMETERS_STATUS, message)

        if server.state == "loading":
            wait = header_is_true(request.headers.get(Header.WAIT_FOR_MODEL))
            wait = wait or bool((payload.options or {}).get("wait_for_model"))
            if not wait:
                return JSONResponse(loading_body(server.model_id, server.estimated_time()), status_code=503)
            await server.wait_loaded()
        if server.state == "failed":
            return _error(500, f"Model {server.model_id} failed to load: {server.error}")
        too_much = server.over_budget(payload)
        if too_much is not None:
            return _error(INVALID_PARAMETERS_STATUS, too_much)
        if server.stopping:
            return _error(503, "The server is shutting down; try again shortly.", {Header.RETRY_AFTER: "5"})
        if server.pending >= server.max_queue + 1:
            return _error(
                503,
                f"Server overloaded: {server.pending} requests are waiting for the model; try again later.",
                headers={Header.RETRY_AFTER: str(server.retry_after())},
            )
        scheduler = None
        if payload.parameters.scheduler:
            try:
                scheduler = server.scheduler_class(payload.parameters.scheduler)
            except ValueError as exc:
                return _error(INVALID_PARAMETERS_STATUS, str(exc))

        fmt = _pick_format(request.headers.get("accept"))
        params = payload.parameters
        logger.info(
            "request %s: prompt of %d characters, size %s, %s steps",
            request_id,
            len(payload.inputs),
            f"{params.width or '-'}x{params.height or '-'}",
            params.num_inference_steps or "default",
        )
        try:
            result = await server.generate(payload, fmt, scheduler, client_gone=request.is_disconnected)
        except Stopped as exc:
            logger.info("request %s stopped: %s", request_id, exc)
            return _error(503, f"Generation stopped: {exc}.", {Header.RETRY_AFTER: "5"})
        except Exception as exc:  # the pipeline's own errors (e.g. out of memory)
            logger.exception("request %s failed", request_id)
            return _error(500, f"Generation failed: {type(exc).__name__}: {exc}")
        logger.info("request %s: done in %.2f s (seed %d)", request_id, result.compute_s, result.seed)
        return Response(
            content=result.data,
            media_type=result.content_type,
            headers={
                Header.COMPUTE_TIME: f"{result.compute_s:.3f}",
                Header.COMPUTE_TYPE: server.compute_type,
                Header.COMPUTE_IMAGES: "1",
                Header.REQUEST_ID: request_id,
                Header.SHA: server.sha,
                Header.SEED: str(result.seed),
            },
        )

    @app.post("/", summary="Generate an image (dedicated-endpoint style URL)")
    async def generate_root(request: Request) -> Response:
        return await answer(request)

    @app.post("/models/{model_id:path}", summary="Generate an image (Inference API style URL)")
    async def generate_model(model_id: str, request: Request) -> Response:
        if model_id != server.model_id:
            return _error(404, f"Model {model_id} does not exist")
        return await answer(request)

    @app.get("/health", summary="Loading state: 200 when ready, 503 while loading or failed")
    async def health() -> JSONResponse:
        body: dict[str, Any] = {"state": server.state, "model_id": server.model_id}
        if server.state == "loading":
            body["estimated_time"] = server.estimated_time()
        elif server.state == "failed":
            body["error"] = server.error
        else:
            body.update(compute_type=server.compute_type, sha=server.sha, pending=server.pending)
        return JSONResponse(body, status_code=200 if server.state == "ready" else 503)

    return app


def serve(
    model: Path | str,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    model_id: str | None = None,
    config: Path | None = None,
    lora: Path | None = None,
    limits: ServeLimits | None = None,
    vae: str | None = None,
) -> None:
    """Serve ``model`` over the text-to-image protocol until interrupted (runs uvicorn).

    The server answers at once; the pipeline loads in the background (503 "loading" meanwhile).

    Args:
        model: Diffusers folder, single ``.safetensors``/``.ckpt`` file or Hub id.
        host: Address to listen on. The server has no authentication: keep the default loopback
            address unless the network is trusted.
        port: TCP port.
        model_id: Id answered at ``/models/{model_id}``; default :func:`default_model_id`.
        config: For a single file: the diffusers folder describing its architecture.
        lora: A LoRA adapter to load into ``model`` (a run's ``lora/`` folder or an adapter file).
        limits: What one request may cost (default :class:`ServeLimits`).
        vae: A VAE to use instead of the model's own (folder or Hub id).

    Raises:
        ValueError: an invalid ``model_id``.
    """
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    app = create_app(model, model_id=model_id, config=config, lora=lora, vae=vae, limits=limits)
    server: ModelServer = app.state.server
    served_id = server.model_id
    if not is_loopback(host):
        logger.warning("Listening on %s: anyone who can reach this port can generate images (no auth).", host)
    logger.info("Serving %s at http://%s:%d/models/%s", served_id, host, port, served_id)

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Stop the generation in progress at its next step, then let uvicorn shut down: it
            # would otherwise wait for that request to finish, however long it takes.
            server.stop()
            super().handle_exit(sig, frame)

    config_ = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
    _Uvicorn(config_).run()
