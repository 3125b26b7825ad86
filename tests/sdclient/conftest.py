"""Fixtures of the client's tests: no ambient token, fast timing, clients pointed at the test server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from client_harness import FAST, MODEL_ID, MakeClient

from sdclient import SDClient
from sdclient.testing import InferenceTestServer


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token from the environment or `hf auth login`, and no usage file in the home folder."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("SDCLIENT_MODEL", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setenv("SDCLIENT_USAGE_FILE", str(tmp_path / "default-usage.sqlite"))


@pytest.fixture
def server(inference_server: InferenceTestServer) -> InferenceTestServer:
    return inference_server


@pytest.fixture
def http_backend() -> str:
    """The backend clients are built with (httpx; the aiohttp opt-in has its own tests)."""
    return "httpx"


@pytest.fixture
async def make_client(server: InferenceTestServer, http_backend: str) -> AsyncIterator[MakeClient]:
    """Build `SDClient`s for the test server with fast timing (closed after the test)."""
    clients: list[SDClient] = []

    def make(model: str | None = None, **kwargs: Any) -> SDClient:
        if "http_client" not in kwargs:
            kwargs.setdefault("http_backend", http_backend)
        kwargs.setdefault("retry", FAST)
        kwargs.setdefault("max_retries", 2)
        kwargs.setdefault("timeout", 5.0)
        kwargs.setdefault("max_wait_for_model", 5.0)
        client = SDClient(model or server.model_url(MODEL_ID), **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture(scope="session")
def tiny_png() -> bytes:
    """A valid 8x8 PNG, for the few unit tests that mock the transport with respx."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()
