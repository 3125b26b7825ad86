"""The least a Python proxy on this stack can do: the floor that `bench_proxy.py` measures beside
`sdproxy`.

A bare ASGI app under uvicorn (uvloop, httptools, no access log) that reads the JSON body, re-sends
it as the protocol's request with one shared `httpx.AsyncClient`, and answers the upstream's bytes.
No validation, limits, queue, retries, logging or error handling: none of what makes a proxy safe
to put on the internet. Whatever `sdproxy` costs beyond this is the price of those.

Run by `bench_proxy.py`: `uvicorn _floor_proxy:app --app-dir benchmarks` with `FLOOR_UPSTREAM` set
to the model's URL.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

UPSTREAM = os.environ["FLOOR_UPSTREAM"]
client = httpx.AsyncClient(limits=httpx.Limits(max_connections=64), timeout=60)


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
    answer = await client.post(UPSTREAM, json={"inputs": request["prompt"], "parameters": parameters})
    headers = [
        (b"content-type", answer.headers.get("content-type", "image/jpeg").encode()),
        (b"content-length", str(len(answer.content)).encode()),
    ]
    await send({"type": "http.response.start", "status": answer.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": answer.content})
