"""A fake Hub over real HTTP (the endpoints ``create_repo`` and ``create_commit`` use), for the
publishing tests; the ``hub`` fixture in conftest.py runs it on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

# Fake tokens, written in two parts so that no secret scanner takes them for real ones.
WRITE_TOKEN = "hf" + "_writeSENTINELtoken0123456789abcdef"
READ_TOKEN = "hf" + "_readSENTINELtoken0123456789abcdef"
SAMPLE_PROMPT = "a photo of sks toy on a beach"


@dataclass
class FakeHub:
    """The Hub endpoints ``create_repo`` + ``create_commit`` use, kept in memory.

    Every file is accepted in "regular" upload mode (inline, base64): no LFS/Xet transfer.
    """

    url: str = ""
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)

    def commits(self, repo_id: str) -> list[dict[str, Any]]:
        return list(self.repos[repo_id]["commits"])


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def do_GET(self) -> None:
            token = self._token()
            hub.requests.append(("GET", self.path, token))
            repo_id = self.path.removeprefix("/api/models/").split("?")[0]
            if token not in (WRITE_TOKEN, READ_TOKEN):
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            if repo_id not in hub.repos:
                return self._reply(404, {"error": "Repository not found"})
            return self._reply(
                200, {"id": repo_id, "sha": "0" * 40, "private": hub.repos[repo_id]["private"]}
            )

        def do_POST(self) -> None:
            token = self._token()
            body = self._body()
            hub.requests.append(("POST", self.path, token))
            if self.path == "/api/validate-yaml":
                content = json.loads(body)["content"]
                try:
                    yaml.safe_load(content.split("---")[1])
                except yaml.YAMLError as exc:
                    return self._reply(400, {"errors": [{"message": str(exc)}]})
                return self._reply(200, {"errors": [], "warnings": []})
            if token not in (WRITE_TOKEN, READ_TOKEN):
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            if self.path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = f"{payload.get('organization') or 'me'}/{payload['name']}"
                if token != WRITE_TOKEN:
                    return self._reply(403, {"error": "You don't have the rights to create a model"})
                if repo_id in hub.repos:
                    return self._reply(
                        409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                    )
                private = payload.get("visibility", "public") == "private"
                hub.repos[repo_id] = {"private": private, "commits": []}
                return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
            prefix, _, action = self.path.removeprefix("/api/models/").rpartition("/")
            repo_id, _, kind = prefix.rpartition("/")
            if repo_id not in hub.repos:
                return self._reply(404, {"error": "Repository not found"})
            if token != WRITE_TOKEN:
                return self._reply(403, {"error": "You don't have the rights to write to this repo"})
            if kind == "preupload":
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self._reply(200, {"files": modes})
            if kind == "commit":
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                files = {
                    line["value"]["path"]: base64.b64decode(line["value"]["content"])
                    for line in lines
                    if line["key"] == "file"
                }
                hub.repos[repo_id]["commits"].append({"message": header["summary"], "files": files})
                oid = f"{len(hub.repos[repo_id]['commits']):040x}"
                return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})
            return self._reply(404, {"error": f"unknown endpoint {action}"})

    return Handler


@contextmanager
def serve_fake_hub() -> Iterator[FakeHub]:
    """A :class:`FakeHub` on a free loopback port (``.url``), stopped afterwards."""
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
