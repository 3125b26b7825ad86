"""Fixtures shared by every part's tests: a real local server of the text-to-image protocol."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sdclient.testing import InferenceTestServer


@pytest.fixture
def inference_server() -> Iterator[InferenceTestServer]:
    """A running `InferenceTestServer` on 127.0.0.1 (a real socket), stopped after the test."""
    with InferenceTestServer() as server:
        yield server
