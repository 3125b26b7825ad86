"""Typed data the client takes and returns: requests, images, timings, events, model status."""

from __future__ import annotations

import io
import json
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._imageinfo import ImageFormat

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "GenerateRequest",
    "GeneratedImage",
    "GenerationEvent",
    "ImageFormat",
    "ModelStatus",
    "Timings",
    "image_filename",
]


class GenerateRequest(BaseModel):
    """One text-to-image request: the prompt and the generation parameters.

    Fields left ``None`` are not sent, so the server's defaults apply.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = Field(min_length=1)
    """What to draw."""
    negative_prompt: str | None = None
    """What to steer away from."""
    width: int | None = Field(default=None, gt=0, le=4096)
    """Image width in pixels (Stable Diffusion wants a multiple of 8)."""
    height: int | None = Field(default=None, gt=0, le=4096)
    """Image height in pixels (Stable Diffusion wants a multiple of 8)."""
    num_inference_steps: int | None = Field(default=None, gt=0, le=1000)
    """Denoising steps: more is slower and usually finer."""
    guidance_scale: float | None = Field(default=None, ge=0)
    """How strongly the image follows the prompt (classifier-free guidance)."""
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    """Random seed; the same seed and parameters give the same image."""
    scheduler: str | None = None
    """A diffusers scheduler class name, e.g. ``"EulerDiscreteScheduler"``."""
    extra_parameters: dict[str, Any] | None = None
    """Further entries for the ``parameters`` object, sent as given."""

    def parameters(self) -> dict[str, Any]:
        """The ``parameters`` object of the request body, unset fields omitted."""
        params: dict[str, Any] = dict(self.extra_parameters or {})
        for name in ("negative_prompt", "width", "height", "num_inference_steps", "guidance_scale"):
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        if self.seed is not None:
            params["seed"] = self.seed
        if self.scheduler is not None:
            params["scheduler"] = self.scheduler
        return params

    def to_payload(self) -> dict[str, Any]:
        """The JSON body of the protocol: ``{"inputs": prompt, "parameters": {...}}``.

        Returns:
            A dict ready for ``json.dumps``; ``parameters`` is left out when empty.
        """
        payload: dict[str, Any] = {"inputs": self.prompt}
        params = self.parameters()
        if params:
            payload["parameters"] = params
        return payload


class Timings(BaseModel):
    """Where the time of one ``generate`` call went."""

    model_config = ConfigDict(frozen=True)

    total_s: float
    """From the first send to the decoded answer (cold-start waits and retries included)."""
    compute_s: float | None = None
    """What the server reported in ``x-compute-time``, if it did."""
    cold_start_wait_s: float = 0.0
    """Seconds spent waiting for the model to load."""


_SLUG = re.compile(r"[^a-z0-9]+")


def image_filename(prompt: str, seed: int | None, *, max_slug: int = 60) -> str:
    """A file name for an image: ``<prompt slug>-<seed>.png``.

    Args:
        prompt: The prompt; reduced to lowercase ASCII letters, digits and dashes.
        seed: The seed, or ``None``.
        max_slug: Longest slug kept.

    Returns:
        For example ``"portrait-of-a-fox-1234.png"``.
    """
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = _SLUG.sub("-", ascii_text.lower()).strip("-")[:max_slug].rstrip("-") or "image"
    return f"{slug}-{seed}.png" if seed is not None else f"{slug}.png"


class GeneratedImage(BaseModel):
    """An image the server generated, with everything needed to reproduce it."""

    model_config = ConfigDict(frozen=True)

    data: bytes = Field(repr=False)
    """The image bytes exactly as the server sent them."""
    content_type: str
    """MIME type detected from the bytes (not from the server's header), e.g. ``image/jpeg``."""
    format: ImageFormat
    """``"png"``, ``"jpeg"`` or ``"webp"``, detected from the bytes."""
    width: int
    """Width in pixels, read from the image header."""
    height: int
    """Height in pixels, read from the image header."""
    request: GenerateRequest
    """What was sent, with the seed that was used filled in."""
    model: str
    """The model id or endpoint URL that answered."""
    timings: Timings
    """Total, compute and cold-start seconds."""
    attempts: int = 1
    """HTTP requests sent for this image (1 when nothing had to be retried or probed)."""
    request_id: str | None = None
    """The server's ``x-request-id``."""
    compute_type: str | None = None
    """The server's ``x-compute-type`` (``cpu``, ``gpu``, a hardware name, ``cache``)."""
    model_sha: str | None = None
    """The model revision served (``x-sha``)."""

    @property
    def seed(self) -> int | None:
        """The seed that was used."""
        return self.request.seed

    def to_pil(self) -> Image.Image:
        """Decode the image with Pillow.

        Returns:
            A loaded ``PIL.Image.Image``.
        """
        from PIL import Image

        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image

    def png_text(self) -> dict[str, str]:
        """The text metadata written into saved PNGs."""
        return {
            "prompt": self.request.prompt,
            "negative_prompt": self.request.negative_prompt or "",
            "seed": "" if self.request.seed is None else str(self.request.seed),
            "parameters": json.dumps(self.request.parameters(), sort_keys=True),
            "model": self.model,
        }

    def save(self, path: str | Path) -> Path:
        """Write the image as a PNG with the prompt, seed and parameters as PNG text chunks.

        JPEG and WebP answers are converted to PNG (losslessly from the decoded pixels).

        Args:
            path: A file path, or an existing directory (the file is then named
                ``<prompt slug>-<seed>.png`` inside it). Parent directories are created.

        Returns:
            The path written.
        """
        from PIL import Image, PngImagePlugin

        target = Path(path)
        if target.is_dir():
            target = target / image_filename(self.request.prompt, self.request.seed)
        target.parent.mkdir(parents=True, exist_ok=True)
        info = PngImagePlugin.PngInfo()
        for key, value in self.png_text().items():
            info.add_itxt(key, value)
        with Image.open(io.BytesIO(self.data)) as image:
            pixels: Image.Image = image
            if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "I", "1"):
                pixels = image.convert("RGB")
            pixels.save(target, format="PNG", pnginfo=info)
        return target


class GenerationEvent(BaseModel):
    """Progress of one ``generate`` call, passed to ``on_event`` hooks.

    ``kind`` is one of: ``queued`` (accepted, waiting for a concurrency slot), ``sending`` (an HTTP
    request goes out; ``attempt`` counts them), ``loading`` (a cold-start wait started or its ETA
    changed; ``eta_s``), ``retrying`` (a transient failure; ``delay_s`` until the next try),
    ``done`` and ``failed`` (``message`` says why).
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["queued", "sending", "loading", "retrying", "done", "failed"]
    """What happened."""
    model: str
    """The model id or endpoint URL."""
    attempt: int = 0
    """HTTP requests sent so far by this call."""
    eta_s: float | None = None
    """``loading``: seconds until the server expects the model to be ready."""
    delay_s: float | None = None
    """``retrying``: seconds until the next attempt."""
    message: str | None = None
    """``retrying``/``failed``: what went wrong; ``loading``: the server's message."""


class ModelStatus(BaseModel):
    """What the client knows about its model without sending anything."""

    model_config = ConfigDict(frozen=True)

    state: Literal["unknown", "ready", "loading", "unavailable"]
    """``unknown`` before any answer, ``ready`` after an image, ``loading`` during a cold start,
    ``unavailable`` after an error that retrying will not fix (404, 410, 401, exhausted retries...)."""
    eta_s: float | None = None
    """While loading: seconds left according to the server's last estimate."""
    message: str | None = None
    """The last error or loading message."""
    updated_at: float
    """When this was last updated (``time.time()``)."""
