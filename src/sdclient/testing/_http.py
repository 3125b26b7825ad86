"""A minimal HTTP/1.1 layer on asyncio streams: enough to read requests and to misbehave.

It reads a request line, headers and a `Content-Length` body; keep-alive is HTTP/1.1's default.
Chunked request bodies are refused (501): clients of the text-to-image protocol send JSON with a
length. Being hand-written is the point: a framework cannot send half a body, reset a connection
or never answer.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import unquote

__all__ = [
    "HttpError",
    "HttpRequest",
    "abort_with_reset",
    "read_request",
    "response_head",
]

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024


class HttpError(Exception):
    """A request that cannot be read; the server answers `status` and closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class HttpRequest:
    """A request read from a connection."""

    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    body: bytes

    @property
    def keep_alive(self) -> bool:
        """Whether the client wants the connection kept open after the response."""
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> HttpRequest | None:
    """Read one request, or return `None` when the client closed the connection between requests.

    A request with `Expect: 100-continue` (curl sends it for bodies over 1 KiB) gets its
    `100 Continue` before the body is read.

    Raises:
        HttpError: A malformed request, headers over 64 KiB, a body over 16 MiB or a chunked body.
        asyncio.IncompleteReadError: The client closed the connection in the middle of a request.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise
    except asyncio.LimitOverrunError as exc:
        raise HttpError(431, "Request headers are larger than 64 KiB") from exc

    lines = head[:-4].decode("latin-1").split("\r\n")
    # Tolerate empty lines before the request line (RFC 9112, section 2.2).
    while lines and not lines[0]:
        lines.pop(0)
    parts = lines[0].split(" ") if lines else []
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, f"Malformed request line: {lines[0][:100] if lines else ''!r}")
    method, target, version = parts

    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, f"Malformed header line: {line[:100]!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value

    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise HttpError(501, "Chunked request bodies are not supported: send a Content-Length")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise HttpError(400, f"Invalid Content-Length: {length_text!r}")
    length = int(length_text)
    if length > MAX_BODY_BYTES:
        raise HttpError(413, f"Request body of {length} bytes is larger than {MAX_BODY_BYTES} bytes")
    if length and headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = await reader.readexactly(length) if length else b""

    path, _, query = target.partition("?")
    return HttpRequest(method.upper(), unquote(path), query, version, headers, body)


def response_head(
    status: int,
    content_type: str | None,
    content_length: int,
    headers: Mapping[str, str],
    *,
    keep_alive: bool,
) -> bytes:
    """The status line and headers of a response, ending with the blank line.

    Args:
        status: The HTTP status.
        content_type: `Content-Type`, or `None` for none.
        content_length: The `Content-Length` announced (which may be a lie, on purpose).
        headers: Extra headers; names are sent as given.
        keep_alive: Whether the connection stays open (`Connection: keep-alive` or `close`).
    """
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", "server: sdclient-testing"]
    if content_type is not None:
        lines.append(f"content-type: {content_type}")
    lines.append(f"content-length: {content_length}")
    lines.append("connection: keep-alive" if keep_alive else "connection: close")
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def abort_with_reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a TCP RST instead of a FIN, sending nothing more."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
