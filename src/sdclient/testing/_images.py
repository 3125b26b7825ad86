"""Cheap, real images for the test server.

An image is a colour (derived from the prompt and seed, from a small palette) over a cached
noise texture, so a 512x512 JPEG weighs about 50 KB like a real generation. Encoded images are
cached by (format, width, height, colour); per-request variety comes from a comment (JPEG `COM`
segment, PNG `tEXt` chunk) holding the seed and a hash of the prompt, which costs no encoding.
"""

from __future__ import annotations

import colorsys
import io
import struct
import zlib
from functools import lru_cache

from PIL import Image, ImageChops

from ._replies import ImageFormat

__all__ = ["colour_index", "encode_image", "render"]

PALETTE_SIZE = 32
"""Number of distinct colours; a benchmark with random seeds encodes at most this many images
per (format, size)."""

_NOISE_SIGMA = 9.0
_JPEG_QUALITY = 85
_WEBP_QUALITY = 80


def _palette_colour(index: int) -> tuple[int, int, int]:
    hue = (index % PALETTE_SIZE) / PALETTE_SIZE
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.65, 0.85)
    return round(red * 255), round(green * 255), round(blue * 255)


def colour_index(prompt: str, seed: object) -> int:
    """The palette index of the image for `prompt` and `seed` (stable across processes)."""
    return zlib.crc32(f"{prompt}\x00{seed}".encode("utf-8", "surrogatepass")) % PALETTE_SIZE


@lru_cache(maxsize=16)
def _texture(width: int, height: int) -> Image.Image:
    """Grey noise centred on 128 plus a soft diagonal gradient, as an RGB image."""
    noise = Image.effect_noise((width, height), _NOISE_SIGMA)
    gradient = Image.linear_gradient("L").resize((width, height)).point(lambda v: 96 + v // 4)
    shade = Image.blend(noise, gradient, 0.25)
    return Image.merge("RGB", (shade, shade, shade))


@lru_cache(maxsize=512)
def encode_image(format: ImageFormat, width: int, height: int, colour: int) -> bytes:
    """Encode the image of palette entry `colour` at `width` x `height` (cached).

    Args:
        format: `"jpeg"`, `"png"` or `"webp"`.
        width: Width in pixels.
        height: Height in pixels.
        colour: Palette index (`colour_index`).

    Returns:
        The encoded image bytes.
    """
    base = Image.new("RGB", (width, height), _palette_colour(colour))
    image = ImageChops.add(base, _texture(width, height), scale=1.0, offset=-128)
    buffer = io.BytesIO()
    if format == "jpeg":
        image.save(buffer, "JPEG", quality=_JPEG_QUALITY)
    elif format == "png":
        image.save(buffer, "PNG", compress_level=1)
    else:
        image.save(buffer, "WEBP", quality=_WEBP_QUALITY)
    return buffer.getvalue()


def _stamp(format: ImageFormat, data: bytes, note: bytes) -> bytes:
    """Insert `note` as metadata without re-encoding (JPEG and PNG; WebP is returned as is)."""
    if format == "jpeg" and data[:2] == b"\xff\xd8":
        note = note[:60000]
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(note) + 2) + note + data[2:]
    if format == "png" and data[-12:-8] == b"\x00\x00\x00\x00" and data[-8:-4] == b"IEND":
        chunk = b"Comment\x00" + note
        crc = zlib.crc32(b"tEXt" + chunk)
        text_chunk = struct.pack(">I", len(chunk)) + b"tEXt" + chunk + struct.pack(">I", crc)
        return data[:-12] + text_chunk + data[-12:]
    return data


def render(format: ImageFormat, width: int, height: int, prompt: str, seed: object) -> bytes:
    """The image answering `prompt` with `seed`: cached pixels, a per-request comment.

    Args:
        format: `"jpeg"`, `"png"` or `"webp"`.
        width: Width in pixels.
        height: Height in pixels.
        prompt: The request's `inputs`.
        seed: The request's `parameters.seed` (any JSON value, `None` when absent).

    Returns:
        The encoded image bytes.
    """
    data = encode_image(format, width, height, colour_index(prompt, seed))
    prompt_hash = zlib.crc32(prompt.encode("utf-8", "surrogatepass"))
    note = f"sdclient.testing seed={seed} prompt-crc32={prompt_hash:08x}".encode()
    return _stamp(format, data, note)
