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
import ipaddress
import json
import logging
import math
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

__all__ = [
    "DEFAULT_MAX_QUEUE",
    "GenerationParameters",
    "ModelServer",
    "TextToImageRequest",
    "create_app",
    "default_model_id",
    "serve",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 8
MAX_SIDE = 2048
MAX_STEPS = 500
# Loading estimate: start-up (importing torch/diffusers is most of it when not done yet) + reading
# the weights.
_LOAD_OVERHEAD_S = 2.0
_IMPORT_S = 10.0
_LOAD_BYTES_PER_S = 150e6
_UNKNOWN_LOAD_S = 60.0  # a Hub id that may have to be downloaded first
_MODEL_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
_CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class GenerationParameters(BaseModel):
    """The ``parameters`` of a request; unset ones take the pipeline's defaults."""

    model_config = ConfigDict(extra="forbid")

    negative_prompt: str | None = None
    width: int | None = Field(default=None, ge=8, le=MAX_SIDE, multiple_of=8)
    height: int | None = Field(default=None, ge=8, le=MAX_SIDE, multiple_of=8)
    num_inference_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    scheduler: str | None = Field(default=None, min_length=1)
    lora_scale: float | None = Field(default=None, ge=0, le=4)
    """Strength of a LoRA adapter (0: the base model, 1: as trained); only for a LoRA model."""


class TextToImageRequest(BaseModel):
    """The JSON body: ``inputs`` (the prompt), ``parameters`` and the legacy ``options``."""

    model_config = ConfigDict(extra="forbid")

    inputs: str = Field(min_length=1)
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)
    options: dict[str, Any] | None = None


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


def _validation_messages(exc: ValidationError) -> list[str]:
    """pydantic errors in the serving container's form: ``"<msg>: `field` in `parameters`"``."""
    messages = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        if loc[:1] == ["parameters"] and len(loc) > 1:
            messages.append(f"{error['msg']}: `{'.'.join(loc[1:])}` in `parameters`")
        else:
            messages.append(f"{error['msg']}: `{'.'.join(loc) or 'body'}`")
    return messages


@dataclass
class _Generated:
    data: bytes
    content_type: str
    seed: int
    compute_s: float


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

    def __post_init__(self) -> None:
        if not _MODEL_ID.fullmatch(self.model_id):
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

    def close(self) -> None:
        """Drop queued generations (the one running finishes)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

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

    async def generate(self, request: TextToImageRequest, fmt: str, scheduler: Any = None) -> _Generated:
        """Queue ``request`` for the worker thread and wait for its image.

        Args:
            request: The validated request.
            fmt: Pillow format name (``PNG``, ``JPEG``, ``WEBP``).
            scheduler: A class from :meth:`scheduler_class`, or None for the pipeline's own.
        """
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._executor, self._generate, request, scheduler, fmt)
        finally:
            self._pending -= 1
        self._avg_compute_s = 0.7 * self._avg_compute_s + 0.3 * result.compute_s
        return result

    def _generate(self, request: TextToImageRequest, scheduler_cls: Any, fmt: str) -> _Generated:
        import torch

        params = request.parameters
        pipe = self.pipe
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        kwargs: dict[str, Any] = {
            k: v
            for k, v in params.model_dump(exclude={"seed", "scheduler", "lora_scale"}).items()
            if v is not None  # unset: the pipeline's own defaults
        }
        if params.lora_scale is not None:
            kwargs["cross_attention_kwargs"] = {"scale": params.lora_scale}
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


def _error(
    status: int, message: str | list[str], headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The protocol's error body: ``{"error": message, **extra}``."""
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def create_app(
    model: Path | str,
    *,
    model_id: str | None = None,
    config: Path | None = None,
    device: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    loader: Callable[[], Any] | None = None,
    lora: Path | None = None,
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
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, 'The body must be JSON: {"inputs": "<prompt>", "parameters": {...}}.')
        if not isinstance(body, dict):
            return _error(400, 'The body must be a JSON object: {"inputs": "<prompt>", "parameters": {...}}.')
        try:
            payload = TextToImageRequest.model_validate(body)
        except ValidationError as exc:
            return _error(400, _validation_messages(exc))
        if payload.parameters.lora_scale is not None and server.lora is None:
            return _error(400, f"parameters.lora_scale: {server.model_id} is not a LoRA model; leave it out.")

        if server.state == "loading":
            wait = request.headers.get("x-wait-for-model", "").lower() in ("1", "true")
            wait = wait or bool((payload.options or {}).get("wait_for_model"))
            if not wait:
                return _error(
                    503,
                    f"Model {server.model_id} is currently loading",
                    estimated_time=server.estimated_time(),
                )
            await server.wait_loaded()
        if server.state == "failed":
            return _error(500, f"Model {server.model_id} failed to load: {server.error}")
        if server.pending >= server.max_queue + 1:
            return _error(
                503,
                f"Server overloaded: {server.pending} requests are waiting for the model; try again later.",
                headers={"Retry-After": str(server.retry_after())},
            )
        scheduler = None
        if payload.parameters.scheduler:
            try:
                scheduler = server.scheduler_class(payload.parameters.scheduler)
            except ValueError as exc:
                return _error(400, str(exc))

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
            result = await server.generate(payload, fmt, scheduler)
        except Exception as exc:  # the pipeline's own errors (e.g. out of memory)
            logger.exception("request %s failed", request_id)
            return _error(500, f"Generation failed: {type(exc).__name__}: {exc}")
        logger.info("request %s: done in %.2f s (seed %d)", request_id, result.compute_s, result.seed)
        return Response(
            content=result.data,
            media_type=result.content_type,
            headers={
                "x-compute-time": f"{result.compute_s:.3f}",
                "x-compute-type": server.compute_type,
                "x-compute-images": "1",
                "x-request-id": request_id,
                "x-sha": server.sha,
                "x-seed": str(result.seed),
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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: Path | str,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    model_id: str | None = None,
    config: Path | None = None,
    lora: Path | None = None,
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
        vae: A VAE to use instead of the model's own (folder or Hub id).

    Raises:
        ValueError: an invalid ``model_id``.
    """
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    app = create_app(model, model_id=model_id, config=config, lora=lora, vae=vae)
    served_id = app.state.server.model_id
    if not _is_loopback(host):
        logger.warning("Listening on %s: anyone who can reach this port can generate images (no auth).", host)
    logger.info("Serving %s at http://%s:%d/models/%s", served_id, host, port, served_id)
    uvicorn.run(app, host=host, port=port, log_level="info")
