"""Typed data the client takes and returns: requests, images, timings, events, model status."""

from __future__ import annotations

import io
import json
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from .protocol import GenerateRequest, PngText

if TYPE_CHECKING:
    from PIL import Image

ImageFormat = Literal["png", "jpeg", "webp"]
"""Formats the client accepts."""

__all__ = [
    "GenerateRequest",
    "GeneratedImage",
    "GenerationEvent",
    "ImageFormat",
    "ModelStatus",
    "Timings",
    "image_filename",
]


class Timings(BaseModel):
    """Where the time of one ``generate`` call went."""

    model_config = ConfigDict(frozen=True)

    total_s: float
    """From the first send to the decoded answer (cold-start waits and retries included)."""
    compute_s: float | None = None
    """What the server reported in ``x-compute-time``, if it did."""
    cold_start_wait_s: float = 0.0
    """Seconds spent waiting for the model to load."""
    request_s: float = 0.0
    """The answered request alone (the image's download for a provider that sends a URL): what
    usage counts as compute time when the server does not report ``compute_s``."""


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
    provider: str = "endpoint"
    """Who served it: an Inference Provider (``hf-inference``, ``fal-ai``, ...) or ``endpoint`` for a URL."""
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
            PngText.PROMPT: self.request.prompt,
            PngText.NEGATIVE_PROMPT: self.request.negative_prompt or "",
            PngText.SEED: "" if self.request.seed is None else str(self.request.seed),
            PngText.PARAMETERS: json.dumps(self.request.parameters(), sort_keys=True),
            PngText.MODEL: self.model,
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

    ``kind`` is one of: ``queued`` (accepted, waiting for a concurrency slot; later, waiting in a
    provider's queue, with ``position`` where it says), ``sending`` (the request goes out;
    ``attempt`` counts them), ``loading`` (a cold-start wait started or its ETA changed;
    ``eta_s``), ``generating`` (the provider started on the job), ``retrying`` (a transient
    failure; ``delay_s`` until the next try), ``done`` and ``failed`` (``message`` says why).
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["queued", "sending", "loading", "generating", "retrying", "done", "failed"]
    """What happened."""
    model: str
    """The model id or endpoint URL."""
    attempt: int = 0
    """HTTP requests sent so far by this call."""
    eta_s: float | None = None
    """``loading``: seconds until the server expects the model to be ready."""
    delay_s: float | None = None
    """``retrying``: seconds until the next attempt."""
    position: int | None = None
    """``queued`` at a provider: the job's place in its queue, where the provider says."""
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
