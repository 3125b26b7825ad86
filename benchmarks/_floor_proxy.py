"""The least a Python proxy on this stack can do: the floor that `bench_proxy.py` measures beside
`sdproxy`.

A bare ASGI app under uvicorn (uvloop, httptools, no access log) that reads the JSON body, re-sends
it as the protocol's request with one shared HTTP client, and answers the upstream's bytes. No
validation, limits, queue, retries, logging or error handling: none of what makes a proxy safe to
put on the internet. Whatever `sdproxy` costs beyond this is the price of those.

Run by `bench_proxy.py`: `uvicorn _floor_proxy:app --app-dir benchmarks` with `FLOOR_UPSTREAM` set
to the model's URL and `FLOOR_CLIENT` to `aiohttp` (one `aiohttp.ClientSession`) or `httpx` (one
`httpx.AsyncClient`).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import httpx

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

UPSTREAM = os.environ["FLOOR_UPSTREAM"]
CLIENT = os.environ.get("FLOOR_CLIENT", "aiohttp")
http = httpx.AsyncClient(limits=httpx.Limits(max_connections=64), timeout=60)
session: aiohttp.ClientSession | None = None  # made in the server's event loop, on first use


async def forward(payload: dict[str, Any]) -> tuple[int, str, bytes]:
    global session
    if CLIENT == "httpx":
        answer = await http.post(UPSTREAM, json=payload)
        return answer.status_code, answer.headers.get("content-type", "image/jpeg"), answer.content
    if session is None:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    async with session.post(UPSTREAM, json=payload) as response:
        return response.status, response.headers.get("content-type", "image/jpeg"), await response.read()


async def app(
    scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/healthz":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    request = json.loads(body)
    parameters = {key: value for key, value in request.items() if key != "prompt"}
    parameters.setdefault("seed", random.randrange(2**32))  # as sdproxy draws one
    status, content_type, content = await forward({"inputs": request["prompt"], "parameters": parameters})
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(content)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
