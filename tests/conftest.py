"""Fixtures shared by every part's tests: offline hubs, a real local server of the text-to-image protocol."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# No test reaches a real hub: huggingface_hub refuses every request unless a test points it at a
# local fake and lifts this (`monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)`).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sdclient.testing import InferenceTestServer


@pytest.fixture
def inference_server() -> Iterator[InferenceTestServer]:
    """A running `InferenceTestServer` on 127.0.0.1 (a real socket), stopped after the test."""
    with InferenceTestServer() as server:
        yield server
