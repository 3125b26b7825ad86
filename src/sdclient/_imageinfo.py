"""What an answer's bytes are: format, size and completeness, read from the headers only.

The client needs the format and size of every image, not its pixels. Pillow's ``Image.open``
reads only the header, but still costs ~60 µs per 512x512 JPEG (it parses every segment in
Python), about 5 % of a whole local request; the size sits at a fixed place in PNG and WebP
headers and in the first SOF segment of a JPEG, so it is read directly here, with Pillow as the
fallback for anything this does not recognise.
"""

from __future__ import annotations

import io
import struct
from typing import Literal

from PIL import Image

__all__ = ["ImageFormat", "image_size", "is_complete", "sniff"]

ImageFormat = Literal["png", "jpeg", "webp"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic): not DHT (C4),
# JPG (C8) or DAC (CC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
_PIL_FORMATS: dict[ImageFormat, list[str]] = {"png": ["PNG"], "jpeg": ["JPEG"], "webp": ["WEBP"]}


def sniff(data: bytes) -> ImageFormat | None:
    """The image format from the magic bytes, or ``None`` for anything else."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def is_complete(fmt: ImageFormat, data: bytes) -> bool:
    """Whether the image ends where its format says (catches bodies cut short in transit)."""
    if fmt == "png":
        return data.rstrip(b"\0")[-8:] == _PNG_END
    if fmt == "jpeg":
        return _JPEG_END in data[-64:]
    return int.from_bytes(data[4:8], "little") + 8 <= len(data)


def _header_size(fmt: ImageFormat, data: bytes) -> tuple[int, int] | None:
    if fmt == "png":
        if data[12:16] != b"IHDR" or len(data) < 24:
            return None
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if fmt == "jpeg":
        i = 2
        while i + 9 <= len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
            elif marker in _JPEG_STANDALONE:
                i += 2
            elif marker in _JPEG_SOF:
                height, width = struct.unpack(">HH", data[i + 5 : i + 9])
                return width, height
            elif marker == 0xDA:  # scan data before any frame header
                return None
            else:
                i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
        return None
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def image_size(fmt: ImageFormat, data: bytes) -> tuple[int, int]:
    """Width and height from the header, without decoding pixels.

    Args:
        fmt: The format :func:`sniff` found.
        data: The image bytes.

    Returns:
        ``(width, height)``.

    Raises:
        ValueError: The header cannot be parsed (by this module or by Pillow).
    """
    size = _header_size(fmt, data)
    if size is not None and size[0] > 0 and size[1] > 0:
        return size
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS[fmt]) as image:  # reads the header only
            return image.size
    except Exception as exc:  # Pillow raises several types for a broken header
        raise ValueError(str(exc) or type(exc).__name__) from exc
